"""RoI poolers of the decoder: detectron2 ``ROIPooler`` with ``ROIAlignV2`` over P2–P5
(docs/official-model.md §1.5).

* :class:`FusedRoIPooler` — one launch of :func:`fastdiffinst.ops.multilevel_roi_align` (level
  assignment in the kernel, no host synchronisation).
* :class:`OfficialRoIPooler` — the official formulation: the level rule, then one
  ``torchvision.ops.roi_align`` per level on its subset, scattered back into box order (the
  per-level loop of :func:`fastdiffinst.reference.multilevel_roi_align`).

Both take ``boxes [B, N, 4]`` (absolute xyxy; any float dtype — detectron2 ``Boxes`` casts them
to fp32) and return ``[B·N, C, R, R]`` in image-major order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdiffinst import reference
from fastdiffinst.common.levels import level_range
from fastdiffinst.modeling.precision import at_least_fp32
from fastdiffinst.ops import multilevel_roi_align


def batched_boxes_to_rois(boxes: Tensor) -> Tensor:
    """``[B, N, 4]`` boxes -> ``[B·N, 5]`` fp32 rois (image index first)."""
    batch, num = boxes.shape[:2]
    index = torch.arange(batch, device=boxes.device, dtype=torch.float32).repeat_interleave(num)
    return torch.cat([index[:, None], boxes.reshape(-1, 4).float()], dim=1)


class _Pooler(nn.Module):
    def __init__(self, output_size: int, spatial_scales: Sequence[float], sampling_ratio: int) -> None:
        super().__init__()
        self.output_size = (output_size, output_size)
        self.spatial_scales = [float(s) for s in spatial_scales]
        self.min_level, self.max_level = level_range(self.spatial_scales)
        self.sampling_ratio = sampling_ratio

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, levels=P{self.min_level}-P{self.max_level}, "
                f"sampling_ratio={self.sampling_ratio}, aligned=True")


class FusedRoIPooler(_Pooler):
    def forward(self, features: list[Tensor], boxes: Tensor) -> Tensor:
        return multilevel_roi_align(features, batched_boxes_to_rois(boxes), self.output_size, self.spatial_scales,
                                    self.sampling_ratio, True)


def _detectron2_roi_align(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                          sampling_ratio: int, aligned: bool) -> Tensor:
    """detectron2's ``ROIAlign``: torchvision's kernel on the rois cast to the features' dtype; half-
    precision features in fp32 and the result cast back, as torchvision's autocast kernel does (its
    CPU kernel has no half-precision version)."""
    from torchvision.ops import roi_align

    dtype = at_least_fp32(input.dtype)
    return roi_align(input.to(dtype), rois.to(dtype), output_size, spatial_scale, sampling_ratio,
                     aligned).to(input.dtype)


class OfficialRoIPooler(_Pooler):
    def forward(self, features: list[Tensor], boxes: Tensor) -> Tensor:
        return reference.multilevel_roi_align(features, batched_boxes_to_rois(boxes), self.output_size,
                                              self.spatial_scales, self.sampling_ratio, True,
                                              roi_align=_detectron2_roi_align)
