"""DiffusionDet box diffusion in plain PyTorch (docs/official-model.md §3): batched references of
``q_sample_boxes`` / ``ddim_step_boxes`` with the semantics of the fused ops, and the official
formulation (per-image loops, float64 buffers, dynamic shapes) kept as the parity oracle and
benchmark baseline. The schedule and the box conversions they share with the fused path live in
:mod:`fastdiffinst.common`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiffinst.common.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, boxes_to_signal, signal_to_boxes
from fastdiffinst.common.diffusion import (
    FAKE_GT_BOX,
    PLACEHOLDER_MIN_SIZE,
    SIGNAL_SCALE,
    DiffusionSchedule,
    QSampleDraws,
)

# ------------------------------------------------------------------------------------------------
# Batched references: the semantics of the fused ops (fixed shapes, any batch size, float64).
# ------------------------------------------------------------------------------------------------

def q_sample_boxes(gt_boxes: Tensor, gt_counts: Tensor, images_whwh: Tensor, *, draws: QSampleDraws,
                   schedule: DiffusionSchedule, scale: float = SIGNAL_SCALE) -> Tensor:
    """Training corruption of padded GT boxes (see ``fastdiffinst.ops.q_sample_boxes``) -> [B, N, 4]
    float64 absolute xyxy."""
    t, noise, placeholder_noise, select_index = draws
    gt = gt_boxes.double()
    fake = torch.tensor(FAKE_GT_BOX, dtype=torch.float64, device=gt.device)
    index = select_index.clamp(min=0)
    chosen = torch.gather(gt, 1, index[..., None].expand(-1, -1, 4))
    chosen = torch.where((gt_counts == 0)[:, None, None], fake, chosen)
    placeholder = placeholder_noise.double() / 6.0 + 0.5
    placeholder = torch.cat([placeholder[..., :2], placeholder[..., 2:].clamp(min=PLACEHOLDER_MIN_SIZE)], dim=-1)
    x0 = torch.where((select_index >= 0)[..., None], chosen, placeholder)
    x0 = (x0 * 2.0 - 1.0) * scale
    x_t = (schedule.sqrt_alphas_cumprod[t][:, None, None] * x0
           + schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None] * noise.double())
    return signal_to_boxes(x_t, images_whwh.double(), scale)


def ddim_step_boxes(x_t: Tensor, images_whwh: Tensor, *, pred_boxes: Tensor, keep: Tensor, t: int, t_next: int,
                    schedule: DiffusionSchedule, noise: Tensor, renew_noise: Tensor, eta: float = 1.0,
                    scale: float = SIGNAL_SCALE) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One DDIM step with box renewal for any batch size (see ``fastdiffinst.ops.ddim_step_boxes``)
    -> (x_next, x0, next_boxes, num_kept), float64 except num_kept (int64)."""
    whwh = images_whwh.double()
    x0 = boxes_to_signal(pred_boxes.double(), whwh, scale)
    num_kept = keep.sum(dim=1)
    if t_next < 0:
        return x0, x0, signal_to_boxes(x0, whwh, scale), num_kept
    alpha, alpha_next = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_next]
    eps = (torch.sqrt(1.0 / alpha) * x_t.double() - x0) / torch.sqrt(1.0 / alpha - 1)
    sigma = eta * torch.sqrt((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha))
    c = torch.sqrt(1 - alpha_next - sigma**2)
    # Kept proposals move to the front in their order: a stable sort on "not kept".
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    gather = order[..., None].expand(-1, -1, 4)
    moved = torch.gather(x0, 1, gather) * torch.sqrt(alpha_next) + c * torch.gather(eps, 1, gather)
    moved = moved + sigma * noise.double()
    slot = torch.arange(keep.shape[1], device=keep.device)
    x_next = torch.where((slot[None, :] < num_kept[:, None])[..., None], moved, renew_noise.double())
    return x_next, x0, signal_to_boxes(x_next, whwh, scale), num_kept


# ------------------------------------------------------------------------------------------------
# The official formulation (DiffusionDet detector.py), per image, with its dynamic shapes.
# ------------------------------------------------------------------------------------------------

def official_prepare_diffusion_concat(gt_boxes: Tensor, num_proposals: int, t: Tensor, noise: Tensor,
                                      placeholder_noise: Tensor | None, select_index: Tensor | None,
                                      schedule: DiffusionSchedule, scale: float = SIGNAL_SCALE) -> Tensor:
    """DiffusionDet's ``prepare_diffusion_concat`` for one image, with its draws passed in.

    gt_boxes [G, 4] normalised cxcywh; t [1] int64; noise [N, 4]; placeholder_noise
    [N - max(G, 1), 4] (None when G >= N); select_index: the kept GT indices, in order, when G > N
    (the official code picks them with ``random.shuffle``). -> [N, 4] normalised xyxy (float64:
    the schedule buffers promote it).
    """
    if gt_boxes.shape[0] == 0:
        gt_boxes = torch.as_tensor([FAKE_GT_BOX], dtype=torch.float, device=gt_boxes.device)
    num_gt = gt_boxes.shape[0]
    if num_gt < num_proposals:
        box_placeholder = placeholder_noise / 6.0 + 0.5
        box_placeholder[:, 2:] = torch.clip(box_placeholder[:, 2:], min=PLACEHOLDER_MIN_SIZE)
        x_start = torch.cat((gt_boxes, box_placeholder), dim=0)
    elif num_gt > num_proposals:
        x_start = gt_boxes[select_index]
    else:
        x_start = gt_boxes
    x_start = (x_start * 2.0 - 1.0) * scale
    a = schedule.sqrt_alphas_cumprod.gather(-1, t).reshape(1, 1)
    b = schedule.sqrt_one_minus_alphas_cumprod.gather(-1, t).reshape(1, 1)
    x = a * x_start + b * noise
    x = torch.clamp(x, min=-1 * scale, max=scale)
    x = ((x / scale) + 1) / 2.0
    return box_cxcywh_to_xyxy(x)


def official_training_boxes(gt_boxes: list[Tensor], images_whwh: Tensor, *, draws: QSampleDraws,
                            schedule: DiffusionSchedule, scale: float = SIGNAL_SCALE) -> Tensor:
    """The official per-image loop of ``prepare_targets`` and the × whwh of ``forward``, fed with the
    fixed-shape draws of :func:`q_sample_boxes` (placeholder rows after the GT rows, the kept subset
    from ``select_index``; N = ``draws.noise.shape[1]`` proposals): the arguments of
    ``q_sample_boxes`` with per-image GT boxes instead of the padded batch and its counts.
    gt_boxes: per image [G_b, 4] normalised cxcywh -> [B, N, 4] float64."""
    t, noise, placeholder_noise, select_index = draws
    num_proposals = noise.shape[1]
    diffused = []
    for b, gt in enumerate(gt_boxes):
        n_gt = max(gt.shape[0], 1)
        placeholder = placeholder_noise[b, n_gt:].clone() if n_gt < num_proposals else None
        select = select_index[b] if gt.shape[0] > num_proposals else None
        diffused.append(official_prepare_diffusion_concat(gt, num_proposals, t[b:b + 1], noise[b], placeholder, select,
                                                          schedule, scale))
    return torch.stack(diffused) * images_whwh[:, None, :]


def official_ddim_step(img: Tensor, pred_boxes: Tensor, image_whwh: Tensor, keep: Tensor, t: int, t_next: int,
                       schedule: DiffusionSchedule, eta: float, noise: Tensor | None, renew_noise: Tensor | None,
                       scale: float = SIGNAL_SCALE) -> tuple[Tensor, Tensor]:
    """One step of DiffusionDet's ``ddim_sample`` for one image, the official way (batch 1).

    img [1, N, 4] (x_t), pred_boxes [1, N, 4] absolute xyxy, image_whwh [1, 4], keep [N] bool;
    noise [1, kept, 4] and renew_noise [1, N - kept, 4] (None when t_next < 0).
    Returns (img for the next step [1, N, 4], x_start [1, N, 4] before renewal).
    """
    x_start = pred_boxes / image_whwh[:, None, :]
    x_start = box_xyxy_to_cxcywh(x_start)
    x_start = (x_start * 2 - 1.0) * scale
    x_start = torch.clamp(x_start, min=-1 * scale, max=scale)
    time_cond = torch.full((1,), t, dtype=torch.long, device=img.device)
    pred_noise = (schedule.sqrt_recip_alphas_cumprod[time_cond].reshape(1, 1, 1) * img - x_start) / \
        schedule.sqrt_recipm1_alphas_cumprod[time_cond].reshape(1, 1, 1)
    full_x_start = x_start
    pred_noise = pred_noise[:, keep, :]
    x_start = x_start[:, keep, :]
    img = img[:, keep, :]
    if t_next < 0:
        return x_start, full_x_start
    alpha = schedule.alphas_cumprod[t]
    alpha_next = schedule.alphas_cumprod[t_next]
    sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
    c = (1 - alpha_next - sigma**2).sqrt()
    img = x_start * alpha_next.sqrt() + c * pred_noise + sigma * noise
    img = torch.cat((img, renew_noise), dim=1)
    return img, full_x_start


def official_ddim_step_batch(x_t: Tensor, images_whwh: Tensor, *, pred_boxes: Tensor, keep: Tensor, t: int,
                             t_next: int, schedule: DiffusionSchedule, noise: Tensor, renew_noise: Tensor,
                             eta: float = 1.0, scale: float = SIGNAL_SCALE) -> tuple[Tensor, Tensor]:
    """:func:`official_ddim_step` image by image, on the arguments of ``ddim_step_boxes`` (a non-final
    step, ``t_next >= 0``): image b's compacted slot p uses ``noise[b, p]``, its refilled slot p
    ``renew_noise[b, p]``, both in the dtype of ``x_t`` as the official ``randn_like(img)``.
    Returns ``(x_next [B, N, 4], the next step's head boxes [B, N, 4])``, the boxes decoded from
    ``x_next`` as the official ``model_predictions`` does."""
    if t_next < 0:
        raise ValueError(f"official_ddim_step_batch: the final step (t_next = {t_next}) keeps a different number of "
                         f"proposals per image; call official_ddim_step per image")
    states = []
    for b in range(x_t.shape[0]):
        kept = int(keep[b].sum())
        state, _ = official_ddim_step(x_t[b:b + 1], pred_boxes[b:b + 1], images_whwh[b:b + 1], keep[b], t, t_next,
                                      schedule, eta, noise[b:b + 1, :kept].to(x_t.dtype),
                                      renew_noise[b:b + 1, kept:].to(x_t.dtype), scale)
        states.append(state)
    x_next = torch.cat(states)
    return x_next, signal_to_boxes(x_next, images_whwh.to(x_next.dtype), scale)
