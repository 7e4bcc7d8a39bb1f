"""Plain-PyTorch references of every fused op, with the same semantics: the parity oracle, the
fallback when the extension is missing, and the "official formulation" baselines.

Also the one home of shared math (the FPN level rule). Imports nothing else of fastdiffinst.
"""

from fastdiffinst.reference.levels import assign_fpn_levels, level_range
from fastdiffinst.reference.roi_align import multilevel_roi_align, roi_align

__all__ = ["assign_fpn_levels", "level_range", "multilevel_roi_align", "roi_align"]
