"""Mask pasting of DiffusionInst's post-processing (docs/official-model.md §5.4) in one kernel.

:func:`paste_masks` turns mask probabilities at a stride (4 in DiffusionInst) into full-resolution
bool masks exactly as the official ``detector_postprocess`` + ``clip_mask`` do (aligned upsampling by
the mask stride, crop to the unpadded image, bilinear resize to the output size, ``> threshold``,
zero outside the box truncated to integers), one output pixel at a time and only inside each box:
the official chain keeps four fp32 maps of ``n × H × W`` (at 800×1216, 15.6 MB per instance); this
keeps only the bool result. Reference: :func:`fastdiffinst.reference.masks.paste_masks`. The kernels
evaluate the two bilinear steps with torch's formulas in fp32, so a pixel can differ from the
reference only where its probability is within rounding of the threshold. Not differentiable
(inference only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastdiffinst import _extension
from fastdiffinst.ops import _checks, _dispatch
from fastdiffinst.reference import masks as reference

_OP = "paste_masks"
_dispatch.register_op(_OP, {"cpp": "fastdiffinst._C kernels (C++ on CPU, CUDA on GPU)",
                            "reference": "the official chain in plain PyTorch (fastdiffinst.reference.masks)"})


def paste_masks(mask_probs: Tensor, boxes: Tensor, image_size: Sequence[int], output_size: Sequence[int],
                threshold: float = 0.5, *, mask_stride: int = 4) -> Tensor:
    """Full-resolution bool masks of ``n`` instances.

    Args:
        mask_probs: ``[n, Hm, Wm]`` probabilities at ``mask_stride`` of the padded image the model
            saw (``mask_stride·Hm >= h``, ``mask_stride·Wm >= w``); any float dtype, computed in
            fp32 as the official code.
        boxes: ``[n, 4]`` xyxy boxes in output pixels, finite (the official code clips them to the
            output first; any box works: its truncated span is clamped to the output).
        image_size: ``(h, w)`` the unpadded (resized) image the model saw.
        output_size: ``(H, W)`` of the masks.
        threshold: a pixel is in the mask when its probability is ``> threshold``.
        mask_stride: the stride of ``mask_probs``, a positive int: the factor of CondInst's aligned
            upsampling (4 in DiffusionInst, whose mask features are at stride 4).

    Returns:
        ``[n, H, W]`` bool.
    """
    _checks.require_tensor(_OP, "mask_probs", mask_probs)
    _checks.require_floating(_OP, "mask_probs", mask_probs)
    _checks.require_rank(_OP, "mask_probs", mask_probs, 3, "[n, Hm, Wm]")
    _checks.require_tensor(_OP, "boxes", boxes)
    _checks.require_floating(_OP, "boxes", boxes)
    _checks.require_same_device(_OP, "boxes", boxes, "mask_probs", mask_probs)
    n = mask_probs.shape[0]
    if boxes.dim() != 2 or boxes.shape != (n, 4):
        raise ValueError(f"{_OP}: boxes must be [n, 4] with n = {n} (one per mask), got {tuple(boxes.shape)}")
    (h, w), (out_h, out_w) = _checks.pair(_OP, "image_size", image_size), _checks.pair(_OP, "output_size", output_size)
    stride = _checks.integer(_OP, "mask_stride", mask_stride)
    if stride < 1:
        raise ValueError(f"{_OP}: mask_stride must be a positive int (the upsampling factor), got {stride}")
    if n and (mask_probs.shape[1] * stride < h or mask_probs.shape[2] * stride < w or 0 in mask_probs.shape[1:]):
        raise ValueError(f"{_OP}: a {mask_probs.shape[1]}x{mask_probs.shape[2]} stride-{stride} map does not cover "
                         f"the {h}x{w} image (needs {stride}·Hm >= h and {stride}·Wm >= w)")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise TypeError(f"{_OP}: threshold must be a number, got {threshold!r}")
    if not math.isfinite(threshold):
        raise ValueError(f"{_OP}: threshold must be finite, got {threshold!r}")
    # The CPU kernel checks the values itself (RuntimeError); on CUDA the check synchronises, so it
    # is opt-in, with the same message and type.
    if boxes.device.type != "cpu" and _dispatch.input_checks_enabled() and not bool(torch.isfinite(boxes).all()):
        raise RuntimeError(f"{_OP}: boxes must be finite")
    if _dispatch.resolve(_OP, mask_probs.device.type) == "reference":
        return reference.paste_masks(mask_probs, boxes, (h, w), (out_h, out_w), float(threshold), mask_stride=stride)
    return torch.ops.fastdiffinst.paste_masks(mask_probs.float(), boxes, h, w, out_h, out_w, float(threshold), stride)


def _register() -> None:
    @torch.library.register_fake("fastdiffinst::paste_masks")
    def _fake(mask_probs, boxes, image_height, image_width, output_height, output_width, threshold, mask_stride=4):
        return mask_probs.new_empty((mask_probs.shape[0], output_height, output_width), dtype=torch.bool)


if _extension.has_ops():
    _register()
