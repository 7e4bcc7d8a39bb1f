"""DiffusionDet's diffusion process over boxes (docs/official-model.md §3.1–§3.2): the cosine
schedule, the DDIM time pairs, the constants of the box corruption and the random inputs of the
corruption (:class:`QSampleDraws`). Shared by the fused ops, the model and the references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

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


class QSampleDraws(NamedTuple):
    """The random inputs of ``q_sample_boxes`` (``fastdiffinst.ops.draw_q_sample_inputs`` draws them)."""

    t: Tensor                  # [B] int64, the diffusion step of each image
    noise: Tensor              # [B, N, 4] standard normal, the diffusion noise ε
    placeholder_noise: Tensor  # [B, N, 4] standard normal, the placeholder boxes
    select_index: Tensor       # [B, N] int64: slot i takes GT select_index[b, i], or a placeholder (-1)


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
