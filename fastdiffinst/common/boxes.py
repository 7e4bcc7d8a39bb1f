"""Box conversions shared by the fused path and the references: (cx, cy, w, h) <-> (x1, y1, x2, y2),
clipping to the image, and the map between absolute boxes and DiffusionDet's diffusion space
(normalised cxcywh mapped to [-scale, scale] with ``x = (b * 2 - 1) * scale``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiffinst.common.diffusion import SIGNAL_SCALE


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    """Absolute xyxy boxes ``[..., 4]`` clipped to the image ``[0, width] × [0, height]``."""
    limits = boxes.new_tensor([width, height, width, height])
    return torch.minimum(boxes.clamp(min=0), limits)


def nonempty_instances(boxes: Tensor, masks: Tensor, threshold: float = 0.0) -> Tensor:
    """``[G]`` bool: instances whose box is wider and higher than ``threshold`` and whose mask
    ``[G, H, W]`` has a pixel (detectron2's ``filter_empty_instances``)."""
    return ((boxes[:, 2] - boxes[:, 0] > threshold) & (boxes[:, 3] - boxes[:, 1] > threshold)
            & (masks.flatten(1) != 0).any(dim=1))


def signal_to_boxes(x: Tensor, images_whwh: Tensor, scale: float = SIGNAL_SCALE) -> Tensor:
    """Diffusion-space boxes [B, N, 4] -> absolute xyxy boxes: clamp, map to [0, 1], × whwh [B, 4]."""
    x = torch.clamp(x, min=-scale, max=scale)
    return box_cxcywh_to_xyxy((x / scale + 1) / 2) * images_whwh[:, None, :]


def boxes_to_signal(boxes: Tensor, images_whwh: Tensor, scale: float = SIGNAL_SCALE) -> Tensor:
    """Absolute xyxy boxes [B, N, 4] -> diffusion space, clamped to [-scale, scale]."""
    x = (box_xyxy_to_cxcywh(boxes / images_whwh[:, None, :]) * 2 - 1) * scale
    return torch.clamp(x, min=-scale, max=scale)
