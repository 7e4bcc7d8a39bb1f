"""DDIM sampling of DiffusionInst's boxes (docs/official-model.md §3.4) for any batch size.

The loop starts from Gaussian boxes, runs the decoder at each (t, t_next) pair, keeps the proposals
whose best class score passes the renewal threshold, and moves them with the DDIM update while the
others are replaced by fresh noise (the ``ddim_step`` of the model's
:class:`~fastdiffinst.modeling.implementation.OpsImplementation`).

:func:`sampling_step` is one whole step (decoder, renewal decision, DDIM update) as a function of
tensors with static shapes and no host synchronisation, so that ``torch.compile(fullgraph=True)``
makes it one graph (and a CUDA graph with ``mode="reduce-overhead"``). It needs the step's noise
before the decoder runs, which every :class:`DrawSource` with ``ahead = True`` gives.

Random draws come from a :class:`DrawSource`:

* :class:`GeneratorDraws` (the default) draws everything up front from a ``torch.Generator`` with
  fixed shapes ``[B, N, 4]``: the initial boxes, then for every non-final step the DDIM noise and the
  renewal boxes.
* :class:`OfficialDraws` calls a ``draws(shape, dtype, device)`` hook in the official order and with
  the official shapes (batch 1): ``x_T [1, N, 4]`` fp32, then per non-final step the noise of the
  kept proposals ``[1, kept, 4]`` (dtype of the state) and, with box renewal, the renewal boxes
  ``[1, N - kept, 4]`` fp32 (drawn even when empty, as the official code does). That is how the
  golden fixture is replayed draw for draw.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from fastdiffinst import ops
from fastdiffinst.common.boxes import signal_to_boxes
from fastdiffinst.common.diffusion import DiffusionSchedule, ddim_time_pairs
from fastdiffinst.config import SamplerConfig

DrawFn = Callable[[tuple[int, ...], torch.dtype, torch.device], Tensor]


class DDIMStep(Protocol):
    """One DDIM step with renewal, with the arguments of :func:`fastdiffinst.ops.ddim_step_boxes`
    (keyword-only, so that no two can be swapped) -> ``(x_next [B, N, 4], the next step's head
    boxes [B, N, 4])``."""

    def __call__(self, x_t: Tensor, images_whwh: Tensor, *, pred_boxes: Tensor, keep: Tensor, t: int, t_next: int,
                 schedule: DiffusionSchedule, noise: Tensor, renew_noise: Tensor, eta: float,
                 scale: float) -> tuple[Tensor, Tensor]: ...


def checked_draw(draws: DrawFn, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``draws(shape, dtype, device)``, checked to have that shape and dtype, on ``device``."""
    value = draws(shape, dtype, device)
    if not isinstance(value, Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"draws hook returned {got}, expected {dtype} {shape}")
    return value.to(device)


@dataclass
class HeadOutput:
    """The decoder's outputs for every stage: ``class_logits [S, B, N, K]``, ``boxes [S, B, N, 4]``
    (fp32 absolute xyxy) and ``kernels [S, B, N, P]``."""

    class_logits: Tensor
    boxes: Tensor
    kernels: Tensor


@dataclass
class SamplingStep:
    """One DDIM step: the head input ``in_boxes [B, N, 4]`` at timestep ``t``, the head's output,
    and ``keep [B, N]`` (renewal decision)."""

    t: int
    t_next: int
    in_boxes: Tensor
    head: HeadOutput
    keep: Tensor


class DrawSource(abc.ABC):
    """Where the sampler's random boxes come from. ``ahead``: a step's draws do not depend on its
    renewal decision (``step`` ignores ``keep``), so the step can run as one function."""

    ahead = False

    @abc.abstractmethod
    def initial(self, batch: int, num: int, device: torch.device) -> Tensor:
        """``x_T [B, N, 4]`` in the diffusion space."""

    @abc.abstractmethod
    def step(self, step: int, keep: Tensor | None, state_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(noise, renew_noise)`` of non-final step ``step``, each ``[B, N, 4]``: compacted slot
        p uses ``noise[:, p]``, refilled slot p uses ``renew_noise[:, p]``. ``keep [B, N]`` is the
        step's renewal decision (None for sources that draw ``ahead``)."""


class GeneratorDraws(DrawSource):
    """Every draw up front from ``generator`` (CPU draws when it is None or a CPU generator, moved to
    the model's device), fixed shapes, no host synchronisation."""

    ahead = True

    def __init__(self, generator: torch.Generator | None, num_steps: int) -> None:
        self.generator = generator
        self.num_steps = num_steps
        self.noise: list[tuple[Tensor, Tensor]] = []

    def initial(self, batch: int, num: int, device: torch.device) -> Tensor:
        source = self.generator.device if self.generator is not None else torch.device("cpu")
        x_t = torch.randn(batch, num, 4, generator=self.generator, device=source)
        self.noise = [ops.draw_ddim_noise(batch, num, self.generator, device=device) for _ in range(self.num_steps - 1)]
        return x_t.to(device)

    def step(self, step: int, keep: Tensor | None, state_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.noise[step]


class OfficialDraws(DrawSource):
    """The official draw order and shapes through ``draws(shape, dtype, device)`` (batch 1)."""

    def __init__(self, draws: DrawFn, box_renewal: bool = True) -> None:
        self.draws = draws
        self.box_renewal = box_renewal

    def initial(self, batch: int, num: int, device: torch.device) -> Tensor:
        if batch != 1:
            raise ValueError(f"the draws hook replays the official code, which samples one image at a time; "
                             f"got a batch of {batch}")
        self.device = device
        return self._draw((1, num, 4), torch.float32)

    def _draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return checked_draw(self.draws, shape, dtype, self.device)

    def step(self, step: int, keep: Tensor | None, state_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        assert keep is not None  # ahead is False: the loop passes the renewal decision
        num = keep.shape[1]
        kept = int(keep.sum())
        noise = torch.zeros(1, num, 4, dtype=torch.float64, device=self.device)
        renew = torch.zeros(1, num, 4, dtype=torch.float64, device=self.device)
        noise[:, :kept] = self._draw((1, kept, 4), state_dtype).double()
        if self.box_renewal:
            renew[:, kept:] = self._draw((1, num - kept, 4), torch.float32).double()
        return noise, renew


def ddim_update(ddim_step: DDIMStep, x_t: Tensor, images_whwh: Tensor, pred_boxes: Tensor, keep: Tensor,
                noise: Tensor, renew_noise: Tensor, *, t: int, t_next: int, schedule: DiffusionSchedule,
                cfg: SamplerConfig) -> tuple[Tensor, Tensor]:
    """``ddim_step`` with the sampler's configuration: ``(x_next, next_boxes)``."""
    return ddim_step(x_t, images_whwh, pred_boxes=pred_boxes, keep=keep, t=t, t_next=t_next, schedule=schedule,
                     noise=noise, renew_noise=renew_noise, eta=cfg.eta, scale=cfg.snr_scale)


def sampling_step(head: Callable[..., tuple[Tensor, Tensor, Tensor]], levels: list[Tensor], images_whwh: Tensor,
                  x_t: Tensor, boxes: Tensor, noise: Tensor | None, renew_noise: Tensor | None, *, t: int, t_next: int,
                  schedule: DiffusionSchedule, cfg: SamplerConfig,
                  ddim_step: DDIMStep) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One DDIM step: the decoder ``head(levels, boxes [B, N, 4], t [B])`` on the state's boxes,
    the renewal decision, and (with ``noise`` and ``renew_noise``, ``[B, N, 4]`` each) the DDIM
    update ``ddim_step``; without them the update is left to the caller.

    Returns ``(class_logits [S, B, N, K], boxes [S, B, N, 4], kernels [S, B, N, P], keep [B, N],
    x_next [B, N, 4], next_boxes [B, N, 4])`` (``x_t`` and ``boxes`` themselves without noise)."""
    t_batch = torch.full((boxes.shape[0],), t, dtype=torch.int64, device=boxes.device)
    class_logits, stage_boxes, kernels = head(levels, boxes, t_batch)
    if cfg.box_renewal:
        keep = torch.sigmoid(class_logits[-1]).amax(-1) > cfg.renewal_threshold
    else:
        keep = torch.ones(stage_boxes.shape[1:3], dtype=torch.bool, device=boxes.device)
    if noise is None or renew_noise is None:
        return class_logits, stage_boxes, kernels, keep, x_t, boxes
    x_next, next_boxes = ddim_update(ddim_step, x_t, images_whwh, stage_boxes[-1], keep, noise, renew_noise, t=t,
                                     t_next=t_next, schedule=schedule, cfg=cfg)
    return class_logits, stage_boxes, kernels, keep, x_next, next_boxes


SamplingStepFn = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]


def ddim_sample(step: SamplingStepFn, images_whwh: Tensor, num_proposals: int, schedule: DiffusionSchedule,
                cfg: SamplerConfig, draws: DrawSource, ddim_step: DDIMStep) -> list[SamplingStep]:
    """Runs the sampler; ``step(x_t, boxes, noise, renew_noise, t=, t_next=)`` is
    :func:`sampling_step` with its decoder, features and images bound (compiled or not),
    ``ddim_step`` the DDIM update of the model's
    :class:`~fastdiffinst.modeling.implementation.OpsImplementation`, which the loop calls itself
    when a step's draws depend on its renewal decision (:class:`OfficialDraws`). Returns every step."""
    batch, device = images_whwh.shape[0], images_whwh.device
    pairs = ddim_time_pairs(cfg.sample_steps, schedule.alphas_cumprod.shape[0])
    x_t = draws.initial(batch, num_proposals, device)
    boxes = signal_to_boxes(x_t, images_whwh, cfg.snr_scale)
    steps = []
    for index, (t, t_next) in enumerate(pairs):
        final = t_next < 0
        noise, renew = draws.step(index, None, x_t.dtype) if draws.ahead and not final else (None, None)
        *head, keep, x_next, next_boxes = step(x_t, boxes, noise, renew, t=t, t_next=t_next)
        out = HeadOutput(*head)
        steps.append(SamplingStep(t, t_next, boxes, out, keep))
        if final:
            break
        if noise is None:
            noise, renew = draws.step(index, keep, x_t.dtype)
            x_next, next_boxes = ddim_update(ddim_step, x_t, images_whwh, out.boxes[-1], keep, noise, renew, t=t,
                                             t_next=t_next, schedule=schedule, cfg=cfg)
        x_t, boxes = x_next, next_boxes
    return steps
