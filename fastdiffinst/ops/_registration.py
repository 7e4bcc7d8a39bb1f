"""The ``torch.library`` plumbing the ops share (docs/design.md §2): the one ``Library`` that holds
the kernels registered from Python, and their autocast kernels.

Fake and autograd registrations go through ``torch.library.register_fake`` /
``register_autograd``, which keep themselves alive; a kernel registered with ``Library.impl`` lives
only as long as its ``Library`` object, which :func:`library` keeps for the life of the process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_library: torch.library.Library | None = None


def library() -> torch.library.Library:
    """The ``IMPL`` library of the ``fastdiffinst`` namespace, created once and never released."""
    global _library
    if _library is None:
        _library = torch.library.Library("fastdiffinst", "IMPL")
    return _library


def register_autocast(op_name: str, cast_inputs: Callable[..., tuple]) -> None:
    """Registers the autocast kernels (CPU and CUDA) of ``fastdiffinst::op_name``:
    ``cast_inputs(device_type, *args) -> args`` casts the op's arguments (for instance to
    ``torch.get_autocast_dtype(device_type)``), then the op runs again below autocast."""
    for key, device_type in (("AutocastCPU", "cpu"), ("AutocastCUDA", "cuda")):
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, _excluded=excluded, _device_type=device_type):
            args = cast_inputs(_device_type, *args)
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return getattr(torch.ops.fastdiffinst, op_name)(*args)

        library().impl(op_name, kernel, key)
