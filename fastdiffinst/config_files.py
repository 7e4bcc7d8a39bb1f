"""Configurations as files: what ``--config`` reads besides a preset name, and what
``fastdiffinst config`` prints.

A file is YAML (``.yaml``/``.yml``, read with PyYAML) or JSON (``.json``) holding the nested fields
of :class:`fastdiffinst.config.ModelConfig` — the full configuration, as ``fastdiffinst config``
prints it or a run writes to its ``config.json``, or only some fields on top of a base::

    _base_: tiny            # a preset, or another file (relative to this one)
    head:
      num_stages: 4
    solver:
      base_lr: 1.0e-4
      steps: [2000, 2600]

Without ``_base_`` the fields not given keep the dataclass defaults (those of ``r50_coco``). The
result is validated like any configuration; unknown fields are errors naming their key path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastdiffinst.config import PRESETS, ModelConfig, config_from_dict, config_to_dict, get_config

SUFFIXES = (".yaml", ".yml", ".json")
BASE_KEY = "_base_"


def load_config(source: str | os.PathLike | ModelConfig) -> ModelConfig:
    """The configuration named by ``source``: a preset name or a YAML/JSON file (module docstring);
    ``ValueError`` naming the file and the problem otherwise. A :class:`ModelConfig` is itself (the
    command line loads ``--config`` once, when it parses it)."""
    if isinstance(source, ModelConfig):
        return source
    if str(source) in PRESETS:
        return get_config(str(source))
    path = Path(source)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"expected a preset ({', '.join(PRESETS)}) or a {'/'.join(SUFFIXES)} file, "
                         f"got {str(source)!r}")
    fields = _resolve(path, ())
    try:
        return config_from_dict(fields)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {str(error).removeprefix('config: ')}") from None


def config_text(cfg: ModelConfig, fmt: str = "yaml") -> str:
    """Every field of ``cfg`` as YAML or JSON text that :func:`load_config` reads back."""
    fields = _plain(config_to_dict(cfg))
    if fmt == "json":
        return json.dumps(fields, indent=2) + "\n"
    if fmt != "yaml":
        raise ValueError(f"fmt must be 'yaml' or 'json', got {fmt!r}")
    return _yaml().safe_dump(fields, sort_keys=False, default_flow_style=False)


def _resolve(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The fields of ``path`` merged onto those of its ``_base_`` (recursively; ``chain`` holds the
    files that led here, to refuse a cycle)."""
    fields = _read(path)
    base = fields.pop(BASE_KEY, None)
    if base is None:
        return fields
    if not isinstance(base, str):
        raise ValueError(f"{path}: {BASE_KEY} must be a preset name or a file path, got {base!r}")
    if base in PRESETS:
        return _merge(_plain(config_to_dict(get_config(base))), fields)
    base_path = (path.parent / base).resolve()
    if base_path in (*chain, path.resolve()):
        raise ValueError(f"{path}: {BASE_KEY} {base!r} leads back to itself")
    return _merge(_resolve(base_path, (*chain, path.resolve())), fields)


def _read(path: Path) -> dict[str, Any]:
    """The mapping in the YAML or JSON file ``path``."""
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the config file {path}: {error}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    else:
        yaml = _yaml()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of fields, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _plain(value: Any) -> Any:
    """``config_to_dict`` output with tuples as lists (what YAML and JSON hold)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ValueError("YAML config files need PyYAML: pip install pyyaml (or use a .json file)") from None
    return yaml
