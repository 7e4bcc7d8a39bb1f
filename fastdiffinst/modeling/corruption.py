"""Training-time corruption of the GT boxes into the decoder's noisy proposals (docs/official-model.md §3.3).

Per image: one timestep t, GT boxes first then placeholder boxes (``N(0.5, 1/6²)``, sizes ≥ 1e-4),
a random subset of N GT boxes when there are more, the fake box (0.5, 0.5, 1, 1) for an image
without GT; diffused to step t and decoded to absolute xyxy (float64, as the official code).

The draws come from a ``torch.Generator`` (fixed shapes, :func:`fastdiffinst.ops.draw_q_sample_inputs`)
or, to replay the official code, from a ``draws(shape, dtype, device)`` hook called in the official
order: per image ``t (1,) int64``, ``noise (N, 4) fp32``, ``placeholders (N - max(G, 1), 4) fp32``
(when G < N). The official code picks the subset of an image with more GT than proposals with
Python's ``random.shuffle``, which the hook cannot replay: that case raises.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from fastdiffinst import ops
from fastdiffinst.common.diffusion import DiffusionSchedule
from fastdiffinst.modeling.sampler import DrawFn, checked_draw
from fastdiffinst.modeling.targets import TrainingTargets


class TrainingBoxes(Protocol):
    """The training corruption, with the arguments of :func:`fastdiffinst.ops.q_sample_boxes`
    (keyword-only after the boxes and image sizes), the GT boxes given per image (``[G_b, 4]``
    normalised cxcywh) instead of padded with their counts; N = ``draws.noise.shape[1]`` ->
    noisy boxes ``[B, N, 4]`` float64 absolute xyxy."""

    def __call__(self, gt_boxes: list[Tensor], images_whwh: Tensor, *, draws: ops.QSampleDraws,
                 schedule: DiffusionSchedule, scale: float) -> Tensor: ...


def official_order_draws(draws: DrawFn, counts: list[int], num_proposals: int,
                         device: torch.device) -> ops.QSampleDraws:
    """The inputs of ``q_sample_boxes`` drawn through the official-order hook (see the module
    docstring), laid out with fixed shapes ``[B, N, 4]``."""
    batch = len(counts)
    t = torch.zeros(batch, dtype=torch.int64, device=device)
    noise = torch.zeros(batch, num_proposals, 4, device=device)
    placeholder = torch.zeros(batch, num_proposals, 4, device=device)
    select = torch.full((batch, num_proposals), -1, dtype=torch.int64, device=device)

    def draw(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return checked_draw(draws, shape, dtype, device)

    for b, count in enumerate(counts):
        if count > num_proposals:
            raise ValueError(f"image {b} has {count} GT boxes for {num_proposals} proposals: the official code picks "
                             f"the subset with Python's random module, which the draws hook cannot replay")
        used = max(count, 1)  # an image without GT keeps the fake box
        t[b] = draw((1,), torch.int64)[0]
        noise[b] = draw((num_proposals, 4), torch.float32)
        if used < num_proposals:
            placeholder[b, used:] = draw((num_proposals - used, 4), torch.float32)
        select[b, :used] = torch.arange(used, device=device)
    return ops.QSampleDraws(t, noise, placeholder, select)


def noisy_proposals(targets: TrainingTargets, images_whwh: Tensor, num_proposals: int, schedule: DiffusionSchedule,
                    scale: float, training_boxes: TrainingBoxes, generator: torch.Generator | None = None,
                    draws: DrawFn | None = None) -> tuple[Tensor, Tensor]:
    """``(boxes [B, N, 4] float64 absolute xyxy, t [B] int64)``: the decoder's training input, from
    ``training_boxes`` of the model's :class:`~fastdiffinst.modeling.implementation.OpsImplementation`."""
    device = images_whwh.device
    counts = targets.counts
    if draws is not None:
        inputs = official_order_draws(draws, counts, num_proposals, device)
    else:
        inputs = ops.draw_q_sample_inputs(counts, num_proposals, generator, device=device)
    gt_cxcywh = [t.boxes_cxcywh for t in targets.images]
    return training_boxes(gt_cxcywh, images_whwh, draws=inputs, schedule=schedule, scale=scale), inputs.t
