"""Mask upsampling and pasting as the official code computes them (CondInst's aligned bilinear
upsampling; DiffusionInst's ``detector_postprocess`` + ``clip_mask``, docs/official-model.md
§5.4): the mask branch uses :func:`aligned_bilinear`, and :func:`paste_masks` is the reference of
:func:`fastdiffinst.ops.paste_masks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiffinst.common.upsampling import aligned_bilinear


def paste_masks(mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int], output_size: tuple[int, int],
                threshold: float = 0.5, *, mask_stride: int = 4) -> Tensor:
    """Masks at full resolution, the official ``detector_postprocess`` + ``clip_mask``: aligned
    upsampling by ``mask_stride`` (×4 in DiffusionInst) of the probabilities, crop to the unpadded
    image, bilinear resize (``align_corners=False``) to the output size, ``> threshold``, zero
    outside the box truncated to integers (rows ``y1..y2-1``, columns ``x1..x2-1``). Its
    temporaries are four fp32 maps per instance at full resolution: callers bound the instances per
    call.

    Args:
        mask_probs: ``[n, Hm, Wm]`` sigmoid probabilities at ``mask_stride`` of the padded image
            (``mask_stride·Hm >= h``, ``mask_stride·Wm >= w``); computed in fp32.
        boxes: ``[n, 4]`` xyxy boxes in output pixels (the official code clips them first).
        image_size: the unpadded size (h, w) the model saw.
        output_size: (H, W) of the result.
        mask_stride: the stride of ``mask_probs``: the aligned upsampling factor.
    Returns:
        ``[n, H, W]`` bool.
    """
    out_h, out_w = output_size
    full = aligned_bilinear(mask_probs[:, None].float(), mask_stride)[:, :, :image_size[0], :image_size[1]]
    # At scale 1 this bilinear resize is the identity (sample i reads pixel i exactly): skipped.
    if (out_h, out_w) != tuple(image_size):
        full = F.interpolate(full, size=(out_h, out_w), mode="bilinear", align_corners=False)
    resized = full[:, 0]
    corners = boxes.to(torch.int64)
    rows = torch.arange(out_h, device=boxes.device)
    cols = torch.arange(out_w, device=boxes.device)
    inside_rows = (rows[None, :] >= corners[:, 1, None]) & (rows[None, :] < corners[:, 3, None])
    inside_cols = (cols[None, :] >= corners[:, 0, None]) & (cols[None, :] < corners[:, 2, None])
    return (resized > threshold) & inside_rows[:, :, None] & inside_cols[:, None, :]
