"""Argument checks run in Python before dispatch: clear ``TypeError``/``ValueError`` messages that
name the argument, what was expected and what was given (docs/design.md §2); and the synchronising
value checks the ops add on CUDA when ``set_input_checks(True)`` (never while torch.compile traces),
with the C++ kernels' messages (the index range checks are in :mod:`fastdiffinst.common.indices`,
shared with the references)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastdiffinst import _extension
from fastdiffinst.common.diffusion import DiffusionSchedule
from fastdiffinst.common.indices import check_index_range as check_index_range
from fastdiffinst.common.indices import first_out_of_range


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


def require_same_devices(op: str, tensors: dict[str, Tensor]) -> None:
    """Every tensor of ``{name: tensor}`` on the device of the first."""
    (first_name, first), *others = tensors.items()
    device = first.device
    for name, value in others:
        if value.device != device:
            require_same_device(op, name, value, first_name, first)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def require_shape(op: str, name: str, value: object, shape: tuple[int, ...], layout: str,
                  dtype: torch.dtype | None = None) -> Tensor:
    """A tensor of exactly ``shape`` (and ``dtype`` when given); ``layout`` names the dimensions,
    e.g. ``"[B, N]"``."""
    require_tensor(op, name, value)
    if tuple(value.shape) != tuple(shape) or (dtype is not None and value.dtype != dtype):
        expected = f"{_dtype_name(dtype)} " if dtype is not None else ""
        raise ValueError(f"{op}: {name} must be {expected}{layout} = {list(shape)}, "
                         f"got {_dtype_name(value.dtype)} {tuple(value.shape)}")
    return value


def require_vector(op: str, name: str, value: object, length: int, dtype: torch.dtype | None = None) -> Tensor:
    """A tensor ``[length]`` (of ``dtype`` when given)."""
    require_tensor(op, name, value)
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{op}: {name} must be [{length}], got shape {tuple(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {value.dtype}")
    return value


def require_boxes(op: str, name: str, value: object, batch: int | None = None, proposals: int | None = None,
                  layout: str = "[B, N, 4]") -> Tensor:
    """A floating-point tensor of boxes ``[B, N, 4]`` (B and N checked when given)."""
    require_tensor(op, name, value)
    require_floating(op, name, value)
    if value.dim() != 3 or value.shape[2] != 4:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(value.shape)}")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(f"{op}: {name} has batch size {value.shape[0]}, expected {batch}")
    if proposals is not None and value.shape[1] != proposals:
        raise ValueError(f"{op}: {name} has {value.shape[1]} proposals, expected {proposals}")
    return value


def require_schedule(op: str, schedule: object, *fields: str) -> tuple[Tensor, ...]:
    """The buffers ``fields`` of a :class:`~fastdiffinst.common.diffusion.DiffusionSchedule`, each a
    non-empty floating-point ``[T]`` of one length T."""
    if not isinstance(schedule, DiffusionSchedule):
        raise TypeError(f"{op}: schedule must be a DiffusionSchedule (fastdiffinst.ops.cosine_schedule()), "
                        f"got {type(schedule).__name__}")
    buffers = tuple(getattr(schedule, field) for field in fields)
    for field, buffer in zip(fields, buffers):
        name = f"schedule.{field}"
        require_tensor(op, name, buffer)
        require_floating(op, name, buffer)
        if buffer.dim() != 1 or buffer.shape[0] == 0 or buffer.shape != buffers[0].shape:
            raise ValueError(f"{op}: {name} must be a non-empty [T] buffer (every buffer of one length), "
                             f"got shape {tuple(buffer.shape)}")
    return buffers


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


def checked_rois(op: str, boxes: Tensor | Sequence[Tensor], device: torch.device) -> Tensor:
    """The ``boxes`` argument of the RoI ops, checked: ``Tensor[K, 5]`` (batch index, x1, y1, x2, y2)
    or a list of per-image ``Tensor[k_i, 4]`` on ``device``, as one ``Tensor[K, 5]`` (the list is
    concatenated with the image index prepended)."""
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
    bad = first_out_of_range(rois[:, 0], 0, batch_size)
    if bad is not None:
        (k,) = bad
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


MAX_SAMPLING_RATIO = _extension.limit("MAX_SAMPLING_RATIO")
# What a valid sampling_ratio is, in the words of the error messages (the ops' and the config's).
SAMPLING_RATIO_RULE = f"at most {MAX_SAMPLING_RATIO} (<= 0 for the adaptive grid)"


def valid_sampling_ratio(value: object) -> bool:
    """Whether ``value`` is a valid ``sampling_ratio``: an int (not a bool) of at most
    :data:`MAX_SAMPLING_RATIO`; any value <= 0 (down to the kernels' int32 minimum) selects the
    adaptive grid. The one rule of the ops and of ``fastdiffinst.config``."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value <= MAX_SAMPLING_RATIO


def sampling_ratio(op: str, value: object) -> int:
    """Samples per bin and axis (:func:`valid_sampling_ratio`)."""
    value = integer(op, "sampling_ratio", value)
    if not valid_sampling_ratio(value):
        raise ValueError(f"{op}: sampling_ratio must be {SAMPLING_RATIO_RULE}, got {value}")
    return value
