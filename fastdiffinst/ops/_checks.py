"""Argument checks run in Python before dispatch: clear ``TypeError``/``ValueError`` messages that
name the argument, what was expected and what was given (docs/design.md §2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def require_tensor(op: str, name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_floating(op: str, name: str, value: Tensor) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {value.dtype}")


def require_rank(op: str, name: str, value: Tensor, rank: int, layout: str) -> None:
    if value.dim() != rank:
        raise ValueError(f"{op}: {name} must be {layout} ({rank}-D), got shape {tuple(value.shape)}")


def require_same_device(op: str, name: str, value: Tensor, other_name: str, other: Tensor) -> None:
    if value.device != other.device:
        raise ValueError(f"{op}: {name} is on {value.device} but {other_name} is on {other.device}")


def pair(op: str, name: str, value: int | Sequence[int]) -> tuple[int, int]:
    """``output_size`` as ``(height, width)``: an int or a pair of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair_ = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        pair_ = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if pair_[0] <= 0 or pair_[1] <= 0:
        raise ValueError(f"{op}: {name} must be positive, got {value!r}")
    return pair_


def boxes_to_rois(op: str, boxes: Tensor | Sequence[Tensor], device: torch.device) -> Tensor:
    """``Tensor[K, 5]`` (batch index, x1, y1, x2, y2), or a list of per-image ``Tensor[k_i, 4]``,
    as one ``Tensor[K, 5]`` (the list is concatenated with the image index prepended)."""
    if isinstance(boxes, Tensor):
        require_floating(op, "boxes", boxes)
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"{op}: boxes given as a tensor must be [K, 5] (batch index, x1, y1, x2, y2), "
                             f"got shape {tuple(boxes.shape)}")
        rois = boxes
    elif isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            require_tensor(op, f"boxes[{i}]", b)
            require_floating(op, f"boxes[{i}]", b)
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"{op}: boxes[{i}] must be [k, 4] (x1, y1, x2, y2), got shape {tuple(b.shape)}")
            if b.device != device:
                raise ValueError(f"{op}: boxes[{i}] is on {b.device} but the features are on {device}")
        if len(boxes) == 0:
            return torch.zeros((0, 5), device=device)
        # At least fp32, so the image index column is exact (bf16 holds integers up to 256 only).
        dtype = torch.float32
        for b in boxes:
            dtype = torch.promote_types(dtype, b.dtype)
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i, dtype=dtype), b.to(dtype)], dim=1) for i, b in enumerate(boxes)]
        )
    else:
        raise TypeError(f"{op}: boxes must be a Tensor[K, 5] or a list of Tensor[k, 4], got {type(boxes).__name__}")
    if rois.device != device:
        raise ValueError(f"{op}: boxes are on {rois.device} but the features are on {device}")
    return rois


def check_roi_values(op: str, rois: Tensor, batch_size: int) -> None:
    """Synchronising value checks with the messages of the CPU kernels (finite boxes, batch index in
    range); run for CUDA tensors when ``set_input_checks(True)``."""
    if rois.numel() == 0:
        return
    finite = torch.isfinite(rois).all(dim=1)
    if not bool(finite.all()):
        k = int((~finite).nonzero()[0, 0])
        raise RuntimeError(f"{op}: rois must be finite, but rois[{k}] = {tuple(rois[k].tolist())}")
    # Truncated toward zero like torchvision, so (-1, B) is the valid range.
    bad = (rois[:, 0] <= -1) | (rois[:, 0] >= batch_size)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"{op}: rois[{k}, 0] is the batch index and must be in [0, {batch_size}), "
                           f"got {rois[k, 0].item()}")


def positive_float(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and value < float("inf")):
        raise ValueError(f"{op}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def integer(op: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    return int(value)


MAX_SAMPLING_RATIO = 1024  # csrc/ops/common/roi_align_math.h: kMaxAdaptiveGrid


def sampling_ratio(op: str, value: object) -> int:
    """Samples per bin and axis: at most 1024; <= 0 for the adaptive grid."""
    value = integer(op, "sampling_ratio", value)
    if not -(2**31) <= value <= MAX_SAMPLING_RATIO:
        raise ValueError(f"{op}: sampling_ratio must be at most {MAX_SAMPLING_RATIO} (<= 0 for the adaptive grid), "
                         f"got {value}")
    return value
