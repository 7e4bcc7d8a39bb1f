"""The index range check (the one home of it): the synchronising value checks of the ops
(:mod:`fastdiffinst.ops._checks`, run for CUDA tensors when ``set_input_checks(True)``) and the
references raise with the message of the C++ kernels, ``op: name[k] = v is out of range [low, high)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    is appended (``" (-1 = no target)"``). Skipped while ``torch.compile`` traces: the check depends
    on the data and would break the graph."""
    if torch.compiler.is_compiling():
        return
    position = first_out_of_range(index, low, high)
    if position is not None:
        where = ", ".join(str(i) for i in position)
        raise RuntimeError(f"{op}: {name}[{where}] = {int(index[position])} is out of range [{low}, {high}){note}")
