"""Backend selection and input-check policy shared by every op (DESIGN §2, §3).

Each op has a default implementation per device and may be forced to another with
:func:`use_backend`; :func:`backend_info` says which implementation each op uses and why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastdiffinst import _extension

# op name -> backends it offers (first = preferred native backend), and a description of each.
_BACKENDS: dict[str, dict[str, str]] = {}
# (op, device type) -> whether fastdiffinst._C has a kernel; read once so that `resolve` is plain
# Python that torch.compile traces without a graph break.
_NATIVE: dict[tuple[str, str], bool] = {}
_forced: dict[str, str] = {}
_input_checks = False


def register_op(op: str, backends: dict[str, str]) -> None:
    """Declares ``op`` and its backends, e.g. ``{"cpp": "...", "reference": "..."}``.

    Every backend but ``"reference"`` is a native one served by ``fastdiffinst._C``.
    """
    _BACKENDS[op] = dict(backends)
    for device in ("cpu", "cuda"):
        _NATIVE[(op, device)] = _extension.has_kernel(op, device)


def resolve(op: str, device_type: str) -> str:
    """The backend ``op`` runs on for tensors on ``device_type``."""
    forced = _forced.get(op)
    if forced == "reference":
        return "reference"
    if _NATIVE.get((op, device_type), False):
        return forced or next(iter(_BACKENDS[op]))
    if forced is not None:
        raise RuntimeError(f"{op}: backend {forced!r} was selected but {_extension.missing_reason(op, device_type)}")
    _extension.fallback(op, device_type)
    return "reference"


@contextlib.contextmanager
def use_backend(op: str, name: str) -> Iterator[None]:
    """Runs ``op`` on backend ``name`` inside the block, e.g. ``use_backend("roi_align", "reference")``."""
    if op not in _BACKENDS:
        raise ValueError(f"use_backend: unknown op {op!r}; known ops: {sorted(_BACKENDS)}")
    if name not in _BACKENDS[op]:
        raise ValueError(f"use_backend: op {op!r} has no backend {name!r}; choose one of {sorted(_BACKENDS[op])}")
    previous = _forced.get(op)
    _forced[op] = name
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(op, None)
        else:
            _forced[op] = previous


def backend_info() -> dict[str, dict[str, str]]:
    """For every op and device ("cpu", "cuda"): the backend it uses now and why."""
    info: dict[str, dict[str, str]] = {}
    for op, backends in _BACKENDS.items():
        info[op] = {}
        for device in ("cpu", "cuda"):
            forced = _forced.get(op)
            if forced is not None:
                info[op][device] = f"{forced}: selected with use_backend ({backends[forced]})"
            elif _NATIVE[(op, device)]:
                name = next(iter(backends))
                info[op][device] = f"{name}: {backends[name]}"
            else:
                info[op][device] = f"reference: {_extension.missing_reason(op, device)}"
    return info


def set_input_checks(enabled: bool) -> None:
    """Turns on the value checks that synchronise the host on CUDA (batch index range, finite boxes).

    CPU kernels always check values; CUDA kernels stay memory-safe without them but return
    zeros for bad rows instead of raising.
    """
    global _input_checks
    _input_checks = bool(enabled)


def input_checks_enabled() -> bool:
    return _input_checks
