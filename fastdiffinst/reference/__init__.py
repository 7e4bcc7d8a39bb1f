"""Plain-PyTorch references of every fused op, with the same semantics: the parity oracle, the
fallback when the extension is missing, and the "official formulation" baselines.

Also the one home of shared math: the FPN level rule (``levels``), the diffusion schedule and box
conversions (``box_diffusion``). Imports nothing else of fastdiffinst.
"""

from fastdiffinst.reference import box_diffusion, dynamic_mask_head, masks
from fastdiffinst.reference.box_diffusion import (
    DiffusionSchedule,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    cosine_schedule,
    ddim_time_pairs,
)
from fastdiffinst.reference.levels import assign_fpn_levels, level_range
from fastdiffinst.reference.roi_align import multilevel_roi_align, roi_align

__all__ = [
    "DiffusionSchedule",
    "assign_fpn_levels",
    "box_cxcywh_to_xyxy",
    "box_diffusion",
    "box_xyxy_to_cxcywh",
    "dynamic_mask_head",
    "cosine_schedule",
    "ddim_time_pairs",
    "level_range",
    "masks",
    "multilevel_roi_align",
    "roi_align",
]
