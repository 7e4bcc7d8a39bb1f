"""DiffusionDet box diffusion in plain PyTorch (docs/official-model.md §3): the cosine schedule,
box conversions, batched references of ``q_sample_boxes`` / ``ddim_step_boxes`` with the semantics
of the fused ops, and the official formulation (per-image loops, float64 buffers, dynamic shapes)
kept as the parity oracle and benchmark baseline.

Conventions: boxes in the diffusion space are normalised (cx, cy, w, h) mapped to [-scale, scale]
with ``x = (b * 2 - 1) * scale``; absolute boxes are xyxy in pixels of the unpadded image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NUM_TIMESTEPS = 1000
SIGNAL_SCALE = 2.0
# Placeholder boxes are drawn as N(0.5, (1/6)^2) per coordinate, sizes at least this.
PLACEHOLDER_MIN_SIZE = 1e-4
# The fake GT box of an image without annotations (normalised cxcywh).
FAKE_GT_BOX = (0.5, 0.5, 1.0, 1.0)


@dataclass(frozen=True)
class DiffusionSchedule:
    """The float64 buffers of DiffusionDet's cosine schedule, each ``[T]``."""

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor


def cosine_schedule(timesteps: int = NUM_TIMESTEPS, s: float = 0.008) -> DiffusionSchedule:
    """The cosine schedule (Nichol & Dhariwal) exactly as DiffusionDet builds it, in float64:
    betas from the ratio of consecutive ᾱ, clipped to [0, 0.999], then ᾱ = cumprod(1 - β)."""
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    f = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    f = f / f[0]
    betas = torch.clip(1 - (f[1:] / f[:-1]), 0, 0.999)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return DiffusionSchedule(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=torch.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=torch.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / alphas_cumprod - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=torch.log(posterior_variance.clamp(min=1e-20)),
        posterior_mean_coef1=betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
    )


def ddim_time_pairs(sampling_steps: int, timesteps: int = NUM_TIMESTEPS) -> list[tuple[int, int]]:
    """The (t, t_next) pairs of DDIM sampling with ``sampling_steps`` steps, e.g. 4 steps:
    [(999, 749), (749, 499), (499, 249), (249, -1)]."""
    if sampling_steps < 1:
        raise ValueError(f"sampling_steps must be >= 1, got {sampling_steps}")
    times = torch.linspace(-1, timesteps - 1, steps=sampling_steps + 1).int().tolist()[::-1]
    return list(zip(times[:-1], times[1:]))


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    """Absolute xyxy boxes ``[..., 4]`` clipped to the image ``[0, width] × [0, height]``."""
    limits = boxes.new_tensor([width, height, width, height])
    return torch.minimum(boxes.clamp(min=0), limits)


def nonempty_instances(boxes: Tensor, masks: Tensor, threshold: float = 0.0) -> Tensor:
    """``[G]`` bool: instances whose box is wider and higher than ``threshold`` and whose mask
    ``[G, H, W]`` has a pixel (detectron2's ``filter_empty_instances``)."""
    return ((boxes[:, 2] - boxes[:, 0] > threshold) & (boxes[:, 3] - boxes[:, 1] > threshold)
            & (masks.flatten(1) != 0).any(dim=1))


def signal_to_boxes(x: Tensor, images_whwh: Tensor, scale: float = SIGNAL_SCALE) -> Tensor:
    """Diffusion-space boxes [B, N, 4] -> absolute xyxy boxes: clamp, map to [0, 1], × whwh [B, 4]."""
    x = torch.clamp(x, min=-scale, max=scale)
    return box_cxcywh_to_xyxy((x / scale + 1) / 2) * images_whwh[:, None, :]


def boxes_to_signal(boxes: Tensor, images_whwh: Tensor, scale: float = SIGNAL_SCALE) -> Tensor:
    """Absolute xyxy boxes [B, N, 4] -> diffusion space, clamped to [-scale, scale]."""
    x = (box_xyxy_to_cxcywh(boxes / images_whwh[:, None, :]) * 2 - 1) * scale
    return torch.clamp(x, min=-scale, max=scale)


# ------------------------------------------------------------------------------------------------
# Batched references: the semantics of the fused ops (fixed shapes, any batch size, float64).
# ------------------------------------------------------------------------------------------------

def q_sample_boxes(gt_boxes: Tensor, gt_counts: Tensor, t: Tensor, noise: Tensor, placeholder_noise: Tensor,
                   select_index: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                   scale: float, images_whwh: Tensor) -> Tensor:
    """Training corruption of padded GT boxes (see ``fastdiffinst.ops.q_sample_boxes``) -> [B, N, 4]
    float64 absolute xyxy."""
    gt = gt_boxes.double()
    fake = torch.tensor(FAKE_GT_BOX, dtype=torch.float64, device=gt.device)
    index = select_index.clamp(min=0)
    chosen = torch.gather(gt, 1, index[..., None].expand(-1, -1, 4))
    chosen = torch.where((gt_counts == 0)[:, None, None], fake, chosen)
    placeholder = placeholder_noise.double() / 6.0 + 0.5
    placeholder = torch.cat([placeholder[..., :2], placeholder[..., 2:].clamp(min=PLACEHOLDER_MIN_SIZE)], dim=-1)
    x0 = torch.where((select_index >= 0)[..., None], chosen, placeholder)
    x0 = (x0 * 2.0 - 1.0) * scale
    x_t = sqrt_alphas_cumprod[t][:, None, None] * x0 + sqrt_one_minus_alphas_cumprod[t][:, None, None] * noise.double()
    return signal_to_boxes(x_t, images_whwh.double(), scale)


def ddim_step_boxes(x_t: Tensor, pred_boxes: Tensor, images_whwh: Tensor, keep: Tensor, t: int, t_next: int,
                    alphas_cumprod: Tensor, eta: float, scale: float, noise: Tensor,
                    renew_noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One DDIM step with box renewal for any batch size (see ``fastdiffinst.ops.ddim_step_boxes``)
    -> (x_next, x0, next_boxes, num_kept), float64 except num_kept (int64)."""
    whwh = images_whwh.double()
    x0 = boxes_to_signal(pred_boxes.double(), whwh, scale)
    num_kept = keep.sum(dim=1)
    if t_next < 0:
        return x0, x0, signal_to_boxes(x0, whwh, scale), num_kept
    alpha, alpha_next = alphas_cumprod[t], alphas_cumprod[t_next]
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


def official_training_boxes(gt_boxes: list[Tensor], images_whwh: Tensor, num_proposals: int, t: Tensor,
                            noise: Tensor, placeholder_noise: Tensor, select_index: Tensor,
                            schedule: DiffusionSchedule, scale: float = SIGNAL_SCALE) -> Tensor:
    """The official per-image loop of ``prepare_targets`` and the × whwh of ``forward``, fed with the
    fixed-shape draws of :func:`q_sample_boxes` (placeholder rows after the GT rows, the kept subset
    from ``select_index``). gt_boxes: per image [G_b, 4] normalised cxcywh -> [B, N, 4] float64."""
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
