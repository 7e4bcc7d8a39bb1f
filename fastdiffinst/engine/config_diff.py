"""The differences between two configurations (``config_to_dict`` form), by key path: how
``--resume`` tells which fields a checkpoint's run and this run disagree on."""

from __future__ import annotations


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``"head.dim_dynamic: checkpoint 16, this run 8"`` for every field that differs, in key order."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += config_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: checkpoint {old!r}, this run {new!r}")
    return lines
