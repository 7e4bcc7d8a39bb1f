"""Loads the native extension ``fastdiffinst._C`` and says whether its kernels are there.

Importing ``_C`` runs its static ``TORCH_LIBRARY`` registrars, which define every
``torch.ops.fastdiffinst.*`` schema and register the CPU (and, when built with CUDA, CUDA) kernels.
If the extension is missing the ops fall back to the plain-PyTorch references with one warning;
with ``FASTDIFFINST_REQUIRE_EXT=1`` (set by ``make test``) a missing extension is an error instead,
so parity tests never compare a reference with itself.
"""

from __future__ import annotations

import os
import warnings

import torch

_LOAD_ERROR: Exception | None = None
try:
    from fastdiffinst import _C
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    _C = None
    _LOAD_ERROR = error


# The kernels' limits, exported by fastdiffinst._C (csrc/fastdiffinst.cpp, from the ops/common/*.h
# constants); the Python argument checks read them from here. Without the extension no native
# kernel runs and these fallbacks (the same values: tests/test_registration.py checks it) state the
# limits the ops keep on every backend.
_FALLBACK_LIMITS = {
    "MAX_SAMPLING_RATIO": 1024,  # RoIAlign samples per bin and axis (roi::kMaxAdaptiveGrid)
    "MAX_LEVELS": 8,  # multilevel_roi_align pyramid levels (roi::kMaxLevels)
    "MASK_HEAD_MAX_CHANNELS": 16,  # dynamic mask head hidden width (mask_head::kMaxChannels)
    "MASK_HEAD_MAX_FEATURE_CHANNELS": 64,  # mask-feature channels (mask_head::kMaxFeatureChannels)
    "MASK_HEAD_MAX_LAYERS": 4,  # mask_head::kMaxLayers
}


def limit(name: str) -> int:
    """The kernel limit ``name`` (a key of ``_FALLBACK_LIMITS``): from ``fastdiffinst._C`` when it is
    loaded, else the fallback. ``ImportError`` when the loaded ``_C`` predates the limit (built from
    older sources and not rebuilt): its kernels may not match the Python layer either."""
    fallback = _FALLBACK_LIMITS[name]
    if _C is None:
        return fallback
    if not hasattr(_C, name):
        raise ImportError(f"fastdiffinst._C is older than the sources (no {name}): rebuild it with `make setup` or "
                          f"`pip install -e . --no-build-isolation`")
    return int(getattr(_C, name))


def require_extension() -> bool:
    """True when ``FASTDIFFINST_REQUIRE_EXT`` asks for native kernels (fallbacks become errors)."""
    return os.environ.get("FASTDIFFINST_REQUIRE_EXT", "0") not in ("", "0")


def has_ops() -> bool:
    """Whether ``fastdiffinst._C`` is loaded."""
    return _C is not None


def built_with_cuda() -> bool:
    """Whether the loaded extension contains the CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``fastdiffinst::<op>`` has a native kernel for ``device_type`` ("cpu" / "cuda")."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiffinst::{op}", key)


def missing_reason(op: str, device_type: str) -> str:
    """Why ``op`` has no native kernel on ``device_type``."""
    if _C is None:
        return f"fastdiffinst._C could not be loaded ({_LOAD_ERROR}); build it with `make setup`"
    if device_type == "cuda" and not built_with_cuda():
        return "fastdiffinst._C was built without CUDA; rebuild with FORCE_CUDA=1 on a machine with a CUDA toolkit"
    return f"fastdiffinst._C has no {device_type} kernel for {op}"


_warned: set[tuple[str, str]] = set()


def fallback(op: str, device_type: str, reason: str | None = None) -> None:
    """Reports a fall-back to the reference: an error under FASTDIFFINST_REQUIRE_EXT, else one warning."""
    reason = reason or missing_reason(op, device_type)
    if require_extension():
        raise RuntimeError(f"{op}: native kernel required (FASTDIFFINST_REQUIRE_EXT=1) but {reason}")
    if (op, device_type) not in _warned:
        _warned.add((op, device_type))
        warnings.warn(f"{op}: using the slow PyTorch reference on {device_type} because {reason}", stacklevel=3)
