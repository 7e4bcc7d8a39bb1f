"""``roi_align``: a drop-in replacement for ``torchvision.ops.roi_align`` on our C++/CUDA kernels.

Same signature and semantics (boxes as ``Tensor[K, 5]`` or a list of ``Tensor[k, 4]``), stricter
on bad input, fp32/fp16/bf16 storage with fp32 accumulation (fp64 too on CPU), boxes of any float
dtype. The schema and device kernels are in ``csrc/``; fake and autograd are registered here. It
needs no autocast kernel: the kernels take the features in any storage dtype and accumulate in fp32,
which is what torchvision's autocast kernel gets by casting to fp32 (the output keeps the input's
dtype either way, and boxes are never down-cast). Gradients come back contiguous (NCHW).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdiffinst import _extension, reference
from fastdiffinst.ops import _checks, _dispatch

_OP = "roi_align"
_dispatch.register_op(
    _OP,
    {"cpp": "fastdiffinst._C kernels (C++ on CPU, CUDA on GPU)", "reference": "plain PyTorch (fastdiffinst.reference)"},
)


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign (Mask R-CNN), exactly as ``torchvision.ops.roi_align``.

    Args:
        input: features ``[B, C, H, W]`` (fp32/fp16/bf16; fp64 on CPU), any memory layout.
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of B per-image
            ``Tensor[k_i, 4]``; image coordinates, any float dtype.
        output_size: ``(PH, PW)`` or an int for a square output.
        spatial_scale: scale from image to ``input`` coordinates (1/stride).
        sampling_ratio: samples per bin and axis; ``<= 0`` for ``ceil(roi_size / output_size)``.
        aligned: shift box coordinates by -0.5 pixel (the correct, detectron2 ``ROIAlignV2`` form).

    Returns:
        ``[K, C, PH, PW]`` in ``input``'s dtype.
    """
    _checks.require_tensor(_OP, "input", input)
    _checks.require_floating(_OP, "input", input)
    _checks.require_rank(_OP, "input", input, 4, "[B, C, H, W]")
    rois = _checks.checked_rois(_OP, boxes, input.device)
    pooled_h, pooled_w = _checks.pair(_OP, "output_size", output_size)
    spatial_scale = _checks.positive_float(_OP, "spatial_scale", spatial_scale)
    sampling_ratio = _checks.sampling_ratio(_OP, sampling_ratio)
    if _dispatch.resolve(_OP, input.device.type) == "reference":
        return reference.roi_align(input, rois, (pooled_h, pooled_w), spatial_scale, sampling_ratio, bool(aligned))
    if input.device.type != "cpu" and _dispatch.input_checks_enabled():
        _checks.check_roi_values(_OP, rois, input.shape[0])
    return torch.ops.fastdiffinst.roi_align(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio,
                                            bool(aligned))


class RoIAlign(nn.Module):
    """``nn.Module`` form of :func:`roi_align` (the interface of ``torchvision.ops.RoIAlign``)."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False) -> None:
        super().__init__()
        self.output_size = _checks.pair(_OP, "output_size", output_size)
        self.spatial_scale = _checks.positive_float(_OP, "spatial_scale", spatial_scale)
        self.sampling_ratio = _checks.sampling_ratio(_OP, sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


def _register() -> None:
    ops = torch.ops.fastdiffinst

    @torch.library.register_fake("fastdiffinst::roi_align")
    def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        torch._check(input.dim() == 4, lambda: f"roi_align: input must be 4-D, got {input.dim()}-D")
        torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: "roi_align: rois must be [K, 5]")
        return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))

    @torch.library.register_fake("fastdiffinst::_roi_align_backward")
    def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                                 height, width, sampling_ratio, aligned):
        return torch.empty((batch_size, channels, height, width), dtype=grad.dtype, device=grad.device)

    def setup_context(ctx, inputs, output):
        input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.input_shape = input.shape
        ctx.args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)

    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.args
        batch, channels, height, width = ctx.input_shape
        grad_input = ops._roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch, channels,
                                             height, width, sampling_ratio, aligned)
        return grad_input, None, None, None, None, None, None

    torch.library.register_autograd("fastdiffinst::roi_align", backward, setup_context=setup_context)

    # The backward is linear in `grad` with the forward as its adjoint, so double backward is
    # roi_align itself.
    def setup_context_backward(ctx, inputs, output):
        grad, rois, spatial_scale, pooled_height, pooled_width, _, _, _, _, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)

    def backward_backward(ctx, grad_grad_input):
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.args
        grad_grad = ops.roi_align(grad_grad_input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                  aligned)
        return (grad_grad,) + (None,) * 10

    torch.library.register_autograd("fastdiffinst::_roi_align_backward", backward_backward,
                                    setup_context=setup_context_backward)


if _extension.has_ops():
    _register()
