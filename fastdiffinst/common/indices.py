"""The index range checks of the synchronising value checks, and when those checks run.

* :func:`first_out_of_range` finds the first index outside its range; every value check that
  mirrors a C++ kernel's index check uses it and raises that kernel's message (the RoI ops: ``rois[k,
  0] is the batch index and must be in [0, B)``; the box-diffusion ops: ``draws.t[b] must be in [0,
  T)``, naming the Python argument).
* :func:`check_index_range` raises the mask-head kernels' message, ``op: name[k] = v is out of range
  [low, high)``; the mask-head ops (Triton path, ``set_input_checks(True)``) and the mask-head
  references use it.
* :func:`value_checks_allowed` is the one rule of when a synchronising value check may run: never
  while ``torch.compile`` traces. :func:`check_index_range` follows it, and so does
  ``fastdiffinst.ops._dispatch.input_checks_enabled``, which guards the ops' value checks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def value_checks_allowed() -> bool:
    """Whether a synchronising value check may run now: not while ``torch.compile`` traces (the
    check depends on the data and would break the graph; the kernels stay memory-safe)."""
    return not torch.compiler.is_compiling()


def first_out_of_range(index: Tensor, low: int, high: int | Tensor) -> tuple[int, ...] | None:
    """Position of the first element of ``index`` (any shape, row-major order) outside
    ``[low, high)``, or None. ``high`` may be a tensor broadcast against ``index`` (a bound per
    row). A floating-point index counts as its value truncated toward zero, as torchvision reads the
    batch index of a RoI, and a NaN one as in range (finiteness is checked apart). Synchronises the
    host on CUDA."""
    if index.numel() == 0:
        return None
    if index.is_floating_point():
        index = index.trunc()
    bad = (index < low) | (index >= high)
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in bad.nonzero()[0])


def check_index_range(op: str, name: str, index: Tensor, low: int, high: int, note: str = "") -> None:
    """Raises ``RuntimeError`` naming the first element of the int64 ``index`` outside
    ``[low, high)``, e.g. ``dynamic_mask_head: image_index[2] = 5 is out of range [0, 2)``; ``note``
    is appended (``" (-1 = no target)"``). Skipped when :func:`value_checks_allowed` says so (while
    ``torch.compile`` traces)."""
    if not value_checks_allowed():
        return
    position = first_out_of_range(index, low, high)
    if position is not None:
        where = ", ".join(str(i) for i in position)
        raise RuntimeError(f"{op}: {name}[{where}] = {int(index[position])} is out of range [{low}, {high}){note}")
