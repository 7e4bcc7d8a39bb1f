"""The fused ops of fastdiffinst, importable on their own (no model, no pycocotools).

* :func:`roi_align`, :class:`RoIAlign` — drop-in ``torchvision.ops.roi_align`` on C++/CUDA kernels.
* :func:`multilevel_roi_align`, :class:`MultiLevelRoIAlign` — detectron2 ``ROIPooler`` in one launch.
* :func:`q_sample_boxes`, :func:`ddim_step_boxes` — DiffusionDet box diffusion (training corruption,
  DDIM step with renewal) for any batch size; :func:`draw_q_sample_inputs`, :func:`draw_ddim_noise`
  draw their random inputs; :func:`cosine_schedule` and the box conversions are re-exported.
* :func:`backend_info`, :func:`use_backend`, :func:`set_input_checks` — dispatch control.
"""

from fastdiffinst.ops._dispatch import backend_info, set_input_checks, use_backend
from fastdiffinst.ops.box_diffusion import (
    QSampleDraws,
    ddim_step_boxes,
    draw_ddim_noise,
    draw_q_sample_inputs,
    q_sample_boxes,
)
from fastdiffinst.ops.multilevel_roi_align import MultiLevelRoIAlign, multilevel_roi_align
from fastdiffinst.ops.roi_align import RoIAlign, roi_align
from fastdiffinst.reference.box_diffusion import (
    DiffusionSchedule,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    cosine_schedule,
    ddim_time_pairs,
)
from fastdiffinst.reference.levels import assign_fpn_levels

__all__ = [
    "DiffusionSchedule",
    "MultiLevelRoIAlign",
    "QSampleDraws",
    "RoIAlign",
    "assign_fpn_levels",
    "backend_info",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "cosine_schedule",
    "ddim_step_boxes",
    "ddim_time_pairs",
    "draw_ddim_noise",
    "draw_q_sample_inputs",
    "multilevel_roi_align",
    "q_sample_boxes",
    "roi_align",
    "set_input_checks",
    "use_backend",
]
