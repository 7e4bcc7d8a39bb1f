"""The fused ops of fastdiffinst, importable on their own (no model, no pycocotools).

* :func:`roi_align`, :class:`RoIAlign` — drop-in ``torchvision.ops.roi_align`` on C++/CUDA kernels.
* :func:`multilevel_roi_align`, :class:`MultiLevelRoIAlign` — detectron2 ``ROIPooler`` in one launch.
* :func:`backend_info`, :func:`use_backend`, :func:`set_input_checks` — dispatch control.
"""

from fastdiffinst.ops._dispatch import backend_info, set_input_checks, use_backend
from fastdiffinst.ops.multilevel_roi_align import MultiLevelRoIAlign, multilevel_roi_align
from fastdiffinst.ops.roi_align import RoIAlign, roi_align
from fastdiffinst.reference.levels import assign_fpn_levels

__all__ = [
    "MultiLevelRoIAlign",
    "RoIAlign",
    "assign_fpn_levels",
    "backend_info",
    "multilevel_roi_align",
    "roi_align",
    "set_input_checks",
    "use_backend",
]
