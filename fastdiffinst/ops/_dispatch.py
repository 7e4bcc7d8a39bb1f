"""Backend selection and input-check policy shared by every op (docs/design.md §2, §3).

Each op has a default implementation per device and may be forced to another with
:func:`use_backend`; :func:`backend_info` says which implementation each op uses and why.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from fastdiffinst import _extension
from fastdiffinst.common.indices import value_checks_allowed

# op name -> backends it offers and a description of each.
_BACKENDS: dict[str, dict[str, str]] = {}
# (op, device type) -> the native backend serving it by default.
_DEFAULT: dict[tuple[str, str], str] = {}
# (op, backend, device type) -> None when available, else why not. Read once, so that `resolve`
# is plain Python that torch.compile traces without a graph break.
_MISSING: dict[tuple[str, str, str], str | None] = {}
_forced: dict[str, str] = {}
_input_checks = False


def _triton_missing(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on ``device_type`` (None when they can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "Triton runs on CPU tensors only through its interpreter (set TRITON_INTERPRET=1 before importing)"
    if device_type == "cuda" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "no CUDA device is available"
    return None


def register_op(op: str, backends: dict[str, str], defaults: dict[str, str] | None = None) -> None:
    """Declares ``op`` and its backends, e.g. ``{"cpp": "...", "reference": "..."}``.

    ``"cpp"`` is served by ``fastdiffinst._C``, ``"triton"`` by ``fastdiffinst.kernels``, and
    ``"reference"`` by ``fastdiffinst.reference``. ``defaults`` maps a device type to the backend it
    uses unless told otherwise (the first backend on every device when not given).
    """
    _BACKENDS[op] = dict(backends)
    first = next(iter(backends))
    for device in ("cpu", "cuda"):
        _DEFAULT[(op, device)] = (defaults or {}).get(device, first)
        for name in backends:
            if name == "cpp":
                missing = None if _extension.has_kernel(op, device) else _extension.missing_reason(op, device)
            elif name == "triton":
                missing = _triton_missing(device)
            else:
                missing = None
            _MISSING[(op, name, device)] = missing


def resolve(op: str, device_type: str) -> str:
    """The backend ``op`` runs on for tensors on ``device_type``."""
    forced = _forced.get(op)
    if forced is not None:
        missing = _MISSING.get((op, forced, device_type), f"it does not run on {device_type}")
        if missing is not None:
            raise RuntimeError(f"{op}: backend {forced!r} was selected but {missing}")
        return forced
    default = _DEFAULT.get((op, device_type))
    if default is not None and _MISSING[(op, default, device_type)] is None:
        return default
    _extension.fallback(op, device_type, _MISSING.get((op, default, device_type)))
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
            default = _DEFAULT[(op, device)]
            if forced is not None:
                info[op][device] = f"{forced}: selected with use_backend ({backends[forced]})"
            elif _MISSING[(op, default, device)] is None:
                info[op][device] = f"{default}: {backends[default]}"
            else:
                info[op][device] = f"reference: {_MISSING[(op, default, device)]}"
    return info


def native_first(op: str, device_type: str) -> bool:
    """Whether ``op`` calls its native kernel at once and runs its Python argument checks only when
    the kernel raises, to name the argument in the error (an op whose per-call host time matters):
    the native kernels check shapes, dtypes and devices themselves, so valid calls skip the Python
    checks' host time. Not for the reference backend, not while torch.compile traces (the fake
    kernels check nothing; the checks then cost nothing at run time) and not on a GPU when the
    synchronising value checks are on (they run before the kernel)."""
    return (resolve(op, device_type) == "cpp" and not torch.compiler.is_compiling()
            and (device_type == "cpu" or not _input_checks))


def set_input_checks(enabled: bool) -> None:
    """Turns on the value checks that synchronise the host on CUDA (batch index range, finite boxes).

    CPU kernels always check values; CUDA kernels stay memory-safe without them but return
    zeros for bad rows instead of raising.
    """
    global _input_checks
    _input_checks = bool(enabled)


def input_checks_enabled() -> bool:
    """Whether to run the synchronising value checks now: when ``set_input_checks(True)``, and never
    while torch.compile traces (:func:`fastdiffinst.common.indices.value_checks_allowed`, the rule of
    every synchronising value check)."""
    return _input_checks and value_checks_allowed()
