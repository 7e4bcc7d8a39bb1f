"""The ops a :class:`~fastdiffinst.modeling.DiffusionInst` runs on, chosen in one place.

A model holds one :class:`OpsImplementation` and hands its members down (to the decoder's RoI
pooler, the sampler, the training corruption, the criterion and the post-processing), the way
detectron2 injects its ``level_poolers``; nothing below the model asks which implementation it is.

* ``"fused"`` — our kernels: one multi-level RoIAlign launch, the fused dynamic mask head and dice
  sums, the batched box-diffusion ops, the per-pixel mask pasting.
* ``"reference"`` — the official formulations of the same computations: per-level torchvision
  RoIAlign, grouped-convolution mask head, per-image float64 DDIM math and training corruption, the
  full-resolution mask chain. The baseline of every parity test and model benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastdiffinst import ops
from fastdiffinst.common.diffusion import DiffusionSchedule
from fastdiffinst.modeling.corruption import TrainingBoxes
from fastdiffinst.modeling.poolers import FusedRoIPooler, OfficialRoIPooler
from fastdiffinst.modeling.postprocess import fused_mask_chunk_size, official_mask_chunk_size
from fastdiffinst.modeling.sampler import DDIMStep
from fastdiffinst.reference import dynamic_mask_head as reference_mask_head
from fastdiffinst.reference import masks as reference_masks
from fastdiffinst.reference.box_diffusion import official_ddim_step_batch, official_training_boxes


@dataclass(frozen=True)
class OpsImplementation:
    """Everything that differs between the fused ops and the official formulations.

    Attributes:
        name: ``"fused"`` or ``"reference"``.
        pooler: the decoder's RoI pooler class, ``(resolution, spatial_scales, sampling_ratio)``.
        channels_last_levels: the pooler reads channels-last copies of P2–P5 on CPU (made once per
            image batch; the C++ RoIAlign transposes NCHW input otherwise).
        mask_head: ``(mask_feats, params, image_index, *, channels, num_layers, sigmoid)`` ->
            ``[n, H, W]`` logits or probabilities.
        dice_sums: ``(mask_feats, params, image_index, gt_masks, gt_index, *, channels,
            num_layers)`` -> ``[n, 3]`` dice sums.
        training_boxes: the training corruption (:class:`fastdiffinst.modeling.corruption.TrainingBoxes`:
            the arguments of ``q_sample_boxes``, keyword-only after the boxes and image sizes).
        ddim_step: one DDIM step with renewal (:class:`fastdiffinst.modeling.sampler.DDIMStep`: the
            arguments of ``ddim_step_boxes``, keyword-only after ``x_t`` and ``images_whwh``).
        paste_masks: ``(mask_probs, boxes, image_size, output_size)`` -> ``[n, H, W]`` bool.
        mask_chunk_size: ``(mask_size, output_size)`` -> instances per pasting call, bounding the
            temporaries of ``paste_masks``.
    """

    name: str
    pooler: type[nn.Module]
    channels_last_levels: bool
    mask_head: Callable[..., Tensor]
    dice_sums: Callable[..., Tensor]
    training_boxes: TrainingBoxes
    ddim_step: DDIMStep
    paste_masks: Callable[..., Tensor]
    mask_chunk_size: Callable[[tuple[int, int], tuple[int, int]], int]


def _fused_training_boxes(gt_boxes: list[Tensor], images_whwh: Tensor, *, draws: ops.QSampleDraws,
                          schedule: DiffusionSchedule, scale: float) -> Tensor:
    """The GT boxes padded into one ``[B, G, 4]`` batch, corrupted by one ``q_sample_boxes`` call."""
    device = images_whwh.device
    counts = [boxes.shape[0] for boxes in gt_boxes]
    padded = torch.zeros((len(counts), max(max(counts), 1), 4), dtype=torch.float32, device=device)
    for b, boxes in enumerate(gt_boxes):
        padded[b, :boxes.shape[0]] = boxes
    return ops.q_sample_boxes(padded, torch.tensor(counts, dtype=torch.int64, device=device), images_whwh, draws=draws,
                              schedule=schedule, scale=scale)


def _fused_ddim_step(x_t: Tensor, images_whwh: Tensor, *, pred_boxes: Tensor, keep: Tensor, t: int, t_next: int,
                     schedule: DiffusionSchedule, noise: Tensor, renew_noise: Tensor, eta: float,
                     scale: float) -> tuple[Tensor, Tensor]:
    """One ``ddim_step_boxes`` call for the whole batch."""
    x_next, _, boxes, _ = ops.ddim_step_boxes(x_t, images_whwh, pred_boxes=pred_boxes, keep=keep, t=t, t_next=t_next,
                                              schedule=schedule, noise=noise, renew_noise=renew_noise, eta=eta,
                                              scale=scale)
    return x_next, boxes


FUSED = OpsImplementation(
    name="fused",
    pooler=FusedRoIPooler,
    channels_last_levels=True,
    mask_head=ops.dynamic_mask_head,
    dice_sums=ops.dynamic_mask_dice_sums,
    training_boxes=_fused_training_boxes,
    ddim_step=_fused_ddim_step,
    paste_masks=ops.paste_masks,
    mask_chunk_size=fused_mask_chunk_size,
)
REFERENCE = OpsImplementation(
    name="reference",
    pooler=OfficialRoIPooler,
    channels_last_levels=False,
    mask_head=reference_mask_head.dynamic_mask_head,
    dice_sums=reference_mask_head.dynamic_mask_dice_sums,
    training_boxes=official_training_boxes,
    ddim_step=official_ddim_step_batch,
    paste_masks=reference_masks.paste_masks,
    mask_chunk_size=official_mask_chunk_size,
)
IMPLEMENTATIONS = {impl.name: impl for impl in (FUSED, REFERENCE)}
OPS_IMPLS = tuple(IMPLEMENTATIONS)


def ops_implementation(name: str) -> OpsImplementation:
    """The implementation called ``name`` (one of :data:`OPS_IMPLS`)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"ops_impl must be one of {OPS_IMPLS}, got {name!r}")
    return IMPLEMENTATIONS[name]
