"""Plain-PyTorch references of every fused op, with the same semantics: the parity oracle, the
fallback when the extension is missing, and the "official formulation" baselines. The math they
share with the fused path (box conversions, schedule, level rule, upsampling) lives in
:mod:`fastdiffinst.common`, so the fused path never imports an oracle.
"""

from fastdiffinst.reference import box_diffusion, dynamic_mask_head, masks
from fastdiffinst.reference.roi_align import multilevel_roi_align, roi_align

__all__ = ["box_diffusion", "dynamic_mask_head", "masks", "multilevel_roi_align", "roi_align"]
