"""The fused ops of fastdiffinst, importable on their own (no model, no pycocotools).

* :func:`roi_align`, :class:`RoIAlign` — drop-in ``torchvision.ops.roi_align`` on C++/CUDA kernels.
* :func:`multilevel_roi_align`, :class:`MultiLevelRoIAlign` — detectron2 ``ROIPooler`` in one launch.
* :func:`q_sample_boxes`, :func:`ddim_step_boxes` — DiffusionDet box diffusion (training corruption,
  DDIM step with renewal) for any batch size; :func:`draw_q_sample_inputs`, :func:`draw_ddim_noise`
  draw their random inputs (:class:`QSampleDraws`); :func:`cosine_schedule` (a :class:`DiffusionSchedule`)
  and the box conversions are re-exported.
* :func:`dynamic_mask_head`, :class:`DynamicMaskHead`, :func:`dynamic_mask_dice_sums` — the
  CondInst/DiffusionInst dynamic mask head fused into one kernel (Triton on CUDA, C++ on CPU), with
  the dice sums of training fused in (:func:`dice_loss_from_sums` turns them into the loss);
  :func:`dynamic_mask_head_num_params` gives the filter length.
* :func:`paste_masks` — DiffusionInst's mask post-processing (aligned ×4 upsampling, resize,
  threshold, box clip) per pixel inside each box, with no full-resolution temporaries.
* :func:`backend_info`, :func:`use_backend`, :func:`set_input_checks` — dispatch control.
"""

from fastdiffinst.common.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from fastdiffinst.common.diffusion import DiffusionSchedule, QSampleDraws, cosine_schedule, ddim_time_pairs
from fastdiffinst.common.levels import assign_fpn_levels
from fastdiffinst.common.mask_head import dice_loss_from_sums
from fastdiffinst.ops._dispatch import backend_info, set_input_checks, use_backend
from fastdiffinst.ops.box_diffusion import ddim_step_boxes, draw_ddim_noise, draw_q_sample_inputs, q_sample_boxes
from fastdiffinst.ops.dynamic_mask_head import DynamicMaskHead, dynamic_mask_dice_sums, dynamic_mask_head
from fastdiffinst.ops.dynamic_mask_head import num_params as dynamic_mask_head_num_params
from fastdiffinst.ops.multilevel_roi_align import MultiLevelRoIAlign, multilevel_roi_align
from fastdiffinst.ops.paste_masks import paste_masks
from fastdiffinst.ops.roi_align import RoIAlign, roi_align

__all__ = [
    "DiffusionSchedule",
    "DynamicMaskHead",
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
    "dice_loss_from_sums",
    "draw_ddim_noise",
    "draw_q_sample_inputs",
    "dynamic_mask_dice_sums",
    "dynamic_mask_head",
    "dynamic_mask_head_num_params",
    "multilevel_roi_align",
    "paste_masks",
    "q_sample_boxes",
    "roi_align",
    "set_input_checks",
    "use_backend",
]
