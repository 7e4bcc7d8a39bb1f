"""DDIM sampling of DiffusionInst's boxes (docs/official-model.md §3.4) for any batch size.

The loop starts from Gaussian boxes, runs the decoder at each (t, t_next) pair, keeps the proposals
whose best class score passes the renewal threshold, and moves them with the DDIM update while the
others are replaced by fresh noise (the ``ddim_step`` of the model's
:class:`~fastdiffinst.modeling.implementation.OpsImplementation`).

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
    """Where the sampler's random boxes come from."""

    @abc.abstractmethod
    def initial(self, batch: int, num: int, device: torch.device) -> Tensor:
        """``x_T [B, N, 4]`` in the diffusion space."""

    @abc.abstractmethod
    def step(self, step: int, keep: Tensor, state_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(noise, renew_noise)`` of non-final step ``step``, each ``[B, N, 4]``: compacted slot
        p uses ``noise[:, p]``, refilled slot p uses ``renew_noise[:, p]``."""


class GeneratorDraws(DrawSource):
    """Every draw up front from ``generator`` (CPU draws when it is None or a CPU generator, moved to
    the model's device), fixed shapes, no host synchronisation."""

    def __init__(self, generator: torch.Generator | None, num_steps: int) -> None:
        self.generator = generator
        self.num_steps = num_steps
        self.noise: list[tuple[Tensor, Tensor]] = []

    def initial(self, batch: int, num: int, device: torch.device) -> Tensor:
        source = self.generator.device if self.generator is not None else torch.device("cpu")
        x_t = torch.randn(batch, num, 4, generator=self.generator, device=source)
        self.noise = [ops.draw_ddim_noise(batch, num, self.generator, device=device) for _ in range(self.num_steps - 1)]
        return x_t.to(device)

    def step(self, step: int, keep: Tensor, state_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
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

    def step(self, step: int, keep: Tensor, state_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        num = keep.shape[1]
        kept = int(keep.sum())
        noise = torch.zeros(1, num, 4, dtype=torch.float64, device=self.device)
        renew = torch.zeros(1, num, 4, dtype=torch.float64, device=self.device)
        noise[:, :kept] = self._draw((1, kept, 4), state_dtype).double()
        if self.box_renewal:
            renew[:, kept:] = self._draw((1, num - kept, 4), torch.float32).double()
        return noise, renew


def ddim_sample(head: Callable[[Tensor, Tensor], HeadOutput], images_whwh: Tensor, num_proposals: int,
                schedule: DiffusionSchedule, cfg: SamplerConfig, draws: DrawSource,
                ddim_step: DDIMStep) -> list[SamplingStep]:
    """Runs the sampler; ``head(boxes [B, N, 4], t [B])`` is the decoder, ``ddim_step`` the DDIM
    update of the model's :class:`~fastdiffinst.modeling.implementation.OpsImplementation`.
    Returns every step."""
    batch, device = images_whwh.shape[0], images_whwh.device
    pairs = ddim_time_pairs(cfg.sample_steps, schedule.alphas_cumprod.shape[0])
    x_t = draws.initial(batch, num_proposals, device)
    boxes = signal_to_boxes(x_t, images_whwh, cfg.snr_scale)
    steps = []
    for index, (t, t_next) in enumerate(pairs):
        out = head(boxes, torch.full((batch,), t, dtype=torch.int64, device=device))
        if cfg.box_renewal:
            keep = torch.sigmoid(out.class_logits[-1]).amax(-1) > cfg.renewal_threshold
        else:
            keep = torch.ones(out.boxes.shape[1:3], dtype=torch.bool, device=device)
        steps.append(SamplingStep(t, t_next, boxes, out, keep))
        if t_next < 0:
            break
        noise, renew = draws.step(index, keep, x_t.dtype)
        x_t, boxes = ddim_step(x_t, images_whwh, pred_boxes=out.boxes[-1], keep=keep, t=t, t_next=t_next,
                               schedule=schedule, noise=noise, renew_noise=renew, eta=cfg.eta, scale=cfg.snr_scale)
    return steps
