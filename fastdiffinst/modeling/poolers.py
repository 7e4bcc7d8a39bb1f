"""RoI poolers of the decoder: detectron2 ``ROIPooler`` with ``ROIAlignV2`` over P2–P5
(docs/official-model.md §1.5).

* :class:`FusedRoIPooler` — one launch of :func:`fastdiffinst.ops.multilevel_roi_align` (level
  assignment in the kernel, no host synchronisation).
* :class:`OfficialRoIPooler` — the official formulation: the level rule, then one
  ``torchvision.ops.roi_align`` per level on its subset, scattered back into box order.

Both take ``boxes [B, N, 4]`` (absolute xyxy; any float dtype — detectron2 ``Boxes`` casts them
to fp32) and return ``[B·N, C, R, R]`` in image-major order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdiffinst.common.levels import assign_fpn_levels, level_range
from fastdiffinst.ops import multilevel_roi_align


def boxes_to_rois(boxes: Tensor) -> Tensor:
    """``[B, N, 4]`` boxes -> ``[B·N, 5]`` fp32 rois (image index first)."""
    batch, num = boxes.shape[:2]
    index = torch.arange(batch, device=boxes.device, dtype=torch.float32).repeat_interleave(num)
    return torch.cat([index[:, None], boxes.reshape(-1, 4).float()], dim=1)


class _Pooler(nn.Module):
    def __init__(self, output_size: int, scales: Sequence[float], sampling_ratio: int) -> None:
        super().__init__()
        self.output_size = (output_size, output_size)
        self.scales = [float(s) for s in scales]
        self.min_level, self.max_level = level_range(self.scales)
        self.sampling_ratio = sampling_ratio

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, levels=P{self.min_level}-P{self.max_level}, "
                f"sampling_ratio={self.sampling_ratio}, aligned=True")


class FusedRoIPooler(_Pooler):
    def forward(self, features: list[Tensor], boxes: Tensor) -> Tensor:
        return multilevel_roi_align(features, boxes_to_rois(boxes), self.output_size, self.scales,
                                    self.sampling_ratio, True)


class OfficialRoIPooler(_Pooler):
    def forward(self, features: list[Tensor], boxes: Tensor) -> Tensor:
        from torchvision.ops import roi_align

        rois = boxes_to_rois(boxes)
        levels = assign_fpn_levels(rois[:, 1:], self.min_level, self.max_level)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1]) + self.output_size)
        for level, (feats, scale) in enumerate(zip(features, self.scales)):
            index = torch.nonzero(levels == level).squeeze(1)
            pooled = roi_align(feats, rois[index].to(feats.dtype), self.output_size, scale, self.sampling_ratio, True)
            out = out.index_put((index,), pooled)
        return out
