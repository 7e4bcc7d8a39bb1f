"""``multilevel_roi_align``: RoIAlign over all FPN levels with in-kernel level assignment.

detectron2 ``ROIPooler`` semantics (level = floor(canonical_level + log2(sqrt(area) /
canonical_box_size + 1e-8)) clamped to the available levels) in one kernel launch per direction:
no per-level Python loop, no ``nonzero``, no host sync; output rows in box order. The backward
scatters into every level's gradient, deterministically on CPU and, under
``torch.use_deterministic_algorithms(True)``, on CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdiffinst import _extension, reference
from fastdiffinst.common.levels import level_range
from fastdiffinst.ops import _checks, _dispatch, _registration

_OP = "multilevel_roi_align"
_dispatch.register_op(
    _OP,
    {"cpp": "fastdiffinst._C kernels (C++ on CPU, CUDA on GPU)",
     "reference": "plain PyTorch per-level loop (fastdiffinst.reference)"},
)
_MAX_LEVELS = _extension.limit("MAX_LEVELS")


def _check_features(features: Sequence[Tensor], spatial_scales: Sequence[float]) -> None:
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"{_OP}: features must be a list of Tensor[B, C, H, W], got {type(features).__name__}")
    if len(features) == 0:
        raise ValueError(f"{_OP}: features must hold at least one feature map")
    if len(features) > _MAX_LEVELS:
        raise ValueError(f"{_OP}: at most {_MAX_LEVELS} feature levels are supported, got {len(features)}")
    if not isinstance(spatial_scales, (list, tuple)) or len(spatial_scales) != len(features):
        given = len(spatial_scales) if isinstance(spatial_scales, (list, tuple)) else repr(spatial_scales)
        raise ValueError(f"{_OP}: len(spatial_scales) must equal len(features) = {len(features)}, got {given}")
    first = _checks.require_tensor(_OP, "features[0]", features[0])
    for i, f in enumerate(features):
        name = f"features[{i}]"
        _checks.require_tensor(_OP, name, f)
        _checks.require_floating(_OP, name, f)
        _checks.require_rank(_OP, name, f, 4, "[B, C, H, W]")
        _checks.require_same_device(_OP, name, f, "features[0]", first)
        if f.shape[0] != first.shape[0] or f.shape[1] != first.shape[1]:
            raise ValueError(f"{_OP}: every level must have the batch size and channels of features[0] "
                             f"({first.shape[0]}, {first.shape[1]}); {name} has ({f.shape[0]}, {f.shape[1]})")
        # Under autocast, mixed storage dtypes are promoted by the autocast kernel below.
        if f.dtype != first.dtype and not torch.is_autocast_enabled(first.device.type):
            raise TypeError(f"{_OP}: every level must have the dtype of features[0] ({first.dtype}); "
                            f"{name} has {f.dtype}")
    if torch.compiler.is_compiling():
        # The scales are Python floats, which a dynamic-shape trace turns into symbols that the
        # checks below cannot inspect; the eager call checks them.
        return
    try:
        level_range(spatial_scales)
    except ValueError as error:
        raise ValueError(f"{_OP}: {error}") from None


def multilevel_roi_align(
    features: Sequence[Tensor],
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
    canonical_box_size: int = 224,
    canonical_level: int = 4,
) -> Tensor:
    """RoIAlign of every box on its FPN level (detectron2 ``ROIPooler``).

    Args:
        features: per level ``[B, C, H_l, W_l]``, finest first, one dtype.
        boxes: ``Tensor[K, 5]`` (batch index, x1, y1, x2, y2) or a list of B ``Tensor[k_i, 4]``,
            image coordinates.
        output_size: ``(PH, PW)`` or an int.
        spatial_scales: per level ``1 / stride``, consecutive powers of two (e.g. 1/4 ... 1/32).
        sampling_ratio, aligned: as in :func:`fastdiffinst.ops.roi_align`.
        canonical_box_size, canonical_level: a box of ``canonical_box_size`` pixels maps to level
            ``canonical_level`` (detectron2 defaults 224 and 4).

    Returns:
        ``[K, C, PH, PW]`` in box order, in the features' dtype.
    """
    _check_features(features, spatial_scales)
    if isinstance(boxes, (list, tuple)) and len(boxes) != features[0].shape[0]:
        raise ValueError(f"{_OP}: boxes must hold one Tensor[k, 4] per image ({features[0].shape[0]}), "
                         f"got {len(boxes)}")
    rois = _checks.checked_rois(_OP, boxes, features[0].device)
    pooled_h, pooled_w = _checks.pair(_OP, "output_size", output_size)
    sampling_ratio = _checks.sampling_ratio(_OP, sampling_ratio)
    canonical_box_size = _checks.integer(_OP, "canonical_box_size", canonical_box_size)
    canonical_level = _checks.integer(_OP, "canonical_level", canonical_level)
    if not 0 < canonical_box_size <= 2**30:
        raise ValueError(f"{_OP}: canonical_box_size must be in [1, 2^30], got {canonical_box_size}")
    if not -64 <= canonical_level <= 64:
        raise ValueError(f"{_OP}: canonical_level must be in [-64, 64], got {canonical_level}")
    scales = [float(s) for s in spatial_scales]
    features = list(features)
    if _dispatch.resolve(_OP, features[0].device.type) == "reference":
        return reference.multilevel_roi_align(features, rois, (pooled_h, pooled_w), scales, sampling_ratio,
                                              bool(aligned), canonical_box_size, canonical_level)
    if features[0].device.type != "cpu" and _dispatch.input_checks_enabled():
        _checks.check_roi_values(_OP, rois, features[0].shape[0])
    return torch.ops.fastdiffinst.multilevel_roi_align(features, rois, scales, pooled_h, pooled_w, sampling_ratio,
                                                       bool(aligned), canonical_box_size, canonical_level)


class MultiLevelRoIAlign(nn.Module):
    """detectron2 ``ROIPooler`` (``ROIAlignV2`` when ``aligned``) on :func:`multilevel_roi_align`.

    ``forward(features: list[Tensor[B, C, H_l, W_l]], boxes: list[Tensor[k_i, 4]]) -> [sum k_i, C, PH, PW]``.
    """

    def __init__(self, output_size: int | tuple[int, int], spatial_scales: Sequence[float], sampling_ratio: int,
                 aligned: bool = True, canonical_box_size: int = 224, canonical_level: int = 4) -> None:
        super().__init__()
        self.output_size = _checks.pair(_OP, "output_size", output_size)
        try:
            self.min_level, self.max_level = level_range(spatial_scales)
        except ValueError as error:
            raise ValueError(f"{_OP}: {error}") from None
        self.spatial_scales = [float(s) for s in spatial_scales]
        self.sampling_ratio = _checks.sampling_ratio(_OP, sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.spatial_scales):
            raise ValueError(f"{_OP}: this pooler has {len(self.spatial_scales)} levels but got {len(features)} "
                             f"feature maps")
        return multilevel_roi_align(features, boxes, self.output_size, self.spatial_scales, self.sampling_ratio,
                                    self.aligned, self.canonical_box_size, self.canonical_level)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, levels=P{self.min_level}-P{self.max_level}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, "
                f"canonical_box_size={self.canonical_box_size}, canonical_level={self.canonical_level}")


def _register() -> None:
    ops = torch.ops.fastdiffinst

    @torch.library.register_fake("fastdiffinst::multilevel_roi_align")
    def _fake(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned,
              canonical_box_size, canonical_level):
        torch._check(len(features) > 0, lambda: f"{_OP}: features must not be empty")
        torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: f"{_OP}: rois must be [K, 5]")
        first = features[0]
        return first.new_empty((rois.shape[0], first.shape[1], pooled_height, pooled_width))

    @torch.library.register_fake("fastdiffinst::_multilevel_roi_align_backward")
    def _backward_fake(grad, rois, spatial_scales, heights, widths, batch_size, channels, sampling_ratio, aligned,
                       canonical_box_size, canonical_level):
        return [torch.empty((batch_size, channels, h, w), dtype=grad.dtype, device=grad.device)
                for h, w in zip(heights, widths)]

    def setup_context(ctx, inputs, output):
        features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, box_size, level = inputs
        ctx.save_for_backward(rois)
        ctx.shapes = [f.shape for f in features]
        ctx.args = (spatial_scales, sampling_ratio, aligned, box_size, level)

    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        spatial_scales, sampling_ratio, aligned, box_size, level = ctx.args
        batch, channels = ctx.shapes[0][0], ctx.shapes[0][1]
        grads = ops._multilevel_roi_align_backward(grad, rois, spatial_scales, [s[2] for s in ctx.shapes],
                                                   [s[3] for s in ctx.shapes], batch, channels, sampling_ratio,
                                                   aligned, box_size, level)
        return list(grads), None, None, None, None, None, None, None, None

    torch.library.register_autograd("fastdiffinst::multilevel_roi_align", backward, setup_context=setup_context)

    # The backward is linear in `grad` with the forward as its adjoint, so double backward is
    # multilevel_roi_align of the per-level grad-of-grads.
    def setup_context_backward(ctx, inputs, output):
        grad, rois, spatial_scales, heights, widths, batch, channels, sampling_ratio, aligned, box_size, level = inputs
        ctx.save_for_backward(rois)
        ctx.pooled = (grad.shape[2], grad.shape[3])
        ctx.args = (spatial_scales, sampling_ratio, aligned, box_size, level)

    def backward_backward(ctx, grad_grads):
        (rois,) = ctx.saved_tensors
        spatial_scales, sampling_ratio, aligned, box_size, level = ctx.args
        grad_grad = ops.multilevel_roi_align(list(grad_grads), rois, spatial_scales, ctx.pooled[0], ctx.pooled[1],
                                             sampling_ratio, aligned, box_size, level)
        return (grad_grad,) + (None,) * 10

    torch.library.register_autograd("fastdiffinst::_multilevel_roi_align_backward", backward_backward,
                                    setup_context=setup_context_backward)

    _registration.register_autocast(_OP, _promote_levels)


def _promote_levels(device_type: str, features: list[Tensor], rois: Tensor, *args) -> tuple:
    """Autocast: levels of different storage dtypes are promoted to a common one (boxes are never
    cast); the kernels accumulate in fp32 whatever the storage dtype."""
    dtype = functools.reduce(torch.promote_types, (f.dtype for f in features))
    return ([f.to(dtype) for f in features], rois, *args)


if _extension.has_ops():
    _register()
