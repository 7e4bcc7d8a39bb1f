"""Box-diffusion ops of DiffusionDet/DiffusionInst (docs/official-model.md §3) on our C++/CUDA kernels.

* :func:`q_sample_boxes` — training corruption: every image's GT boxes padded to N proposals
  (placeholders from noise, a random subset when there are more GT than proposals, a fake box for
  images without GT) and diffused to a random step t.
* :func:`ddim_step_boxes` — one DDIM update with box renewal for **any batch size**: kept proposals
  compacted to the front in order, the rest refilled with fresh noise.

Fixed shapes, no data-dependent sizes and no host synchronisation on CUDA, so both stay inside
``torch.compile`` graphs. All randomness comes in as tensors (:func:`draw_q_sample_inputs`,
:func:`draw_ddim_noise`), so the official draw order can be replayed. Arithmetic is float64, as
in the official code (its schedule buffers are float64); outputs are float64. Not differentiable
(the inputs are targets or detached predictions).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastdiffinst import _extension, reference
from fastdiffinst.common.diffusion import NUM_TIMESTEPS
from fastdiffinst.ops import _checks, _dispatch

_BACKENDS = {"cpp": "fastdiffinst._C kernels (C++ on CPU, CUDA on GPU)",
             "reference": "batched plain PyTorch (fastdiffinst.reference.box_diffusion)"}
_dispatch.register_op("q_sample_boxes", _BACKENDS)
_dispatch.register_op("ddim_step_boxes", _BACKENDS)


def _boxes(op: str, name: str, value: object, batch: int | None = None, proposals: int | None = None,
           layout: str = "[B, N, 4]") -> Tensor:
    """A float tensor [B, N, 4] (B, N checked when given)."""
    _checks.require_tensor(op, name, value)
    _checks.require_floating(op, name, value)
    if value.dim() != 3 or value.shape[2] != 4:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(value.shape)}")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(f"{op}: {name} has batch size {value.shape[0]}, expected {batch}")
    if proposals is not None and value.shape[1] != proposals:
        raise ValueError(f"{op}: {name} has {value.shape[1]} proposals, expected {proposals}")
    return value


def _vector(op: str, name: str, value: object, length: int, dtype: torch.dtype | None = None) -> Tensor:
    _checks.require_tensor(op, name, value)
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{op}: {name} must be [{length}], got shape {tuple(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {value.dtype}")
    return value


def _same_device(op: str, reference_name: str, reference_tensor: Tensor, **tensors: Tensor) -> None:
    device = reference_tensor.device
    if any(t.device != device for t in tensors.values()):
        for name, t in tensors.items():
            _checks.require_same_device(op, name, t, reference_name, reference_tensor)


def _schedule(op: str, name: str, value: object) -> Tensor:
    _checks.require_tensor(op, name, value)
    _checks.require_floating(op, name, value)
    if value.dim() != 1 or value.shape[0] == 0:
        raise ValueError(f"{op}: {name} must be a non-empty [T] schedule, got shape {tuple(value.shape)}")
    return value


def _q_sample_args_ok(gt_boxes, gt_counts, t, noise, placeholder_noise, select_index, sqrt_alphas_cumprod,
                      sqrt_one_minus_alphas_cumprod, scale, images_whwh) -> bool:
    """Fast path of the argument checks (one expression; the ops are called per training step): True
    when every check of :func:`_check_q_sample_args` passes."""
    try:
        batch, _, four = gt_boxes.shape
        proposals = noise.shape[1]
        timesteps = sqrt_alphas_cumprod.shape[0]
        device = gt_boxes.device
        return (four == 4 and timesteps > 0 and noise.shape == (batch, proposals, 4)
                and placeholder_noise.shape == (batch, proposals, 4) and select_index.shape == (batch, proposals)
                and gt_counts.shape == (batch,) and t.shape == (batch,) and images_whwh.shape == (batch, 4)
                and sqrt_alphas_cumprod.shape == (timesteps,) and sqrt_one_minus_alphas_cumprod.shape == (timesteps,)
                and gt_counts.dtype == torch.int64 and t.dtype == torch.int64 and select_index.dtype == torch.int64
                and gt_boxes.is_floating_point() and noise.is_floating_point()
                and placeholder_noise.is_floating_point() and sqrt_alphas_cumprod.is_floating_point()
                and sqrt_one_minus_alphas_cumprod.is_floating_point() and images_whwh.is_floating_point()
                and type(scale) in (int, float) and 0 < scale < float("inf")
                and all(x.device == device for x in (gt_counts, t, noise, placeholder_noise, select_index,
                                                     sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                                     images_whwh)))
    except (AttributeError, TypeError, ValueError, IndexError):
        return False


def _check_q_sample_args(gt_boxes, gt_counts, t, noise, placeholder_noise, select_index, sqrt_alphas_cumprod,
                         sqrt_one_minus_alphas_cumprod, scale, images_whwh) -> None:
    """The argument checks with messages naming the argument (run when the fast path fails)."""
    op = "q_sample_boxes"
    _boxes(op, "gt_boxes", gt_boxes, layout="[B, G, 4]")
    batch = gt_boxes.shape[0]
    _boxes(op, "noise", noise, batch)
    proposals = noise.shape[1]
    _boxes(op, "placeholder_noise", placeholder_noise, batch, proposals)
    _vector(op, "gt_counts", gt_counts, batch, torch.int64)
    _vector(op, "t", t, batch, torch.int64)
    _checks.require_tensor(op, "select_index", select_index)
    if tuple(select_index.shape) != (batch, proposals) or select_index.dtype != torch.int64:
        raise ValueError(f"{op}: select_index must be int64 [B, N] = [{batch}, {proposals}], "
                         f"got {select_index.dtype} {tuple(select_index.shape)}")
    _schedule(op, "sqrt_alphas_cumprod", sqrt_alphas_cumprod)
    _schedule(op, "sqrt_one_minus_alphas_cumprod", sqrt_one_minus_alphas_cumprod)
    if sqrt_one_minus_alphas_cumprod.shape != sqrt_alphas_cumprod.shape:
        raise ValueError(f"{op}: the two schedule buffers must have the same length")
    _checks.require_tensor(op, "images_whwh", images_whwh)
    _checks.require_floating(op, "images_whwh", images_whwh)
    if tuple(images_whwh.shape) != (batch, 4):
        raise ValueError(f"{op}: images_whwh must be [B, 4] = [{batch}, 4], got {tuple(images_whwh.shape)}")
    _checks.positive_float(op, "scale", scale)
    _same_device(op, "gt_boxes", gt_boxes, gt_counts=gt_counts, t=t, noise=noise, placeholder_noise=placeholder_noise,
                 select_index=select_index, sqrt_alphas_cumprod=sqrt_alphas_cumprod,
                 sqrt_one_minus_alphas_cumprod=sqrt_one_minus_alphas_cumprod, images_whwh=images_whwh)


def q_sample_boxes(gt_boxes: Tensor, gt_counts: Tensor, t: Tensor, noise: Tensor, placeholder_noise: Tensor,
                   select_index: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                   scale: float, images_whwh: Tensor) -> Tensor:
    """Noisy training proposals from padded GT boxes (docs/official-model.md §3.3), all images at once.

    Args:
        gt_boxes: ``[B, G, 4]`` normalised (cx, cy, w, h); rows ``>= gt_counts[b]`` are ignored.
        gt_counts: ``[B]`` int64, GT boxes per image (0 = no annotation: the fake box (0.5, 0.5, 1, 1)).
        t: ``[B]`` int64 diffusion step per image, in ``[0, T)``.
        noise: ``[B, N, 4]`` standard-normal draws ε.
        placeholder_noise: ``[B, N, 4]`` standard-normal draws; slot i of image b, when a
            placeholder, is ``placeholder_noise[b, i] / 6 + 0.5`` with w, h >= 1e-4.
        select_index: ``[B, N]`` int64: slot i takes GT ``select_index[b, i]`` (0 for the fake box
            of an image without GT), or is a placeholder when -1.
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: ``[T]`` schedule buffers.
        scale: signal scale (2.0).
        images_whwh: ``[B, 4]`` (w, h, w, h) of the unpadded images.

    Returns:
        ``[B, N, 4]`` float64 noisy boxes, absolute xyxy:
        ``decode(clamp(sqrt(ᾱ_t)·(x0·2 − 1)·scale + sqrt(1 − ᾱ_t)·ε))``.
    """
    op = "q_sample_boxes"
    if not _q_sample_args_ok(gt_boxes, gt_counts, t, noise, placeholder_noise, select_index, sqrt_alphas_cumprod,
                             sqrt_one_minus_alphas_cumprod, scale, images_whwh):
        _check_q_sample_args(gt_boxes, gt_counts, t, noise, placeholder_noise, select_index, sqrt_alphas_cumprod,
                             sqrt_one_minus_alphas_cumprod, scale, images_whwh)
    scale = float(scale)
    if gt_boxes.device.type != "cpu" and _dispatch.input_checks_enabled():
        _check_q_sample_values(gt_boxes, gt_counts, t, select_index, sqrt_alphas_cumprod.shape[0], noise,
                               placeholder_noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, images_whwh)
    if _dispatch.resolve(op, gt_boxes.device.type) == "reference":
        return reference.box_diffusion.q_sample_boxes(gt_boxes, gt_counts, t, noise, placeholder_noise, select_index,
                                                      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, scale,
                                                      images_whwh)
    return torch.ops.fastdiffinst.q_sample_boxes(gt_boxes, gt_counts, t, noise, placeholder_noise, select_index,
                                                 sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, scale,
                                                 images_whwh)


def _check_q_sample_values(gt_boxes, gt_counts, t, select_index, timesteps, noise, placeholder_noise,
                           sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, images_whwh) -> None:
    """Synchronising value checks for CUDA (the CPU kernel makes them itself)."""
    op = "q_sample_boxes"
    if bool(((gt_counts < 0) | (gt_counts > gt_boxes.shape[1])).any()):
        raise RuntimeError(f"{op}: gt_counts must be in [0, G = {gt_boxes.shape[1]}], got {gt_counts.tolist()}")
    if bool(((t < 0) | (t >= timesteps)).any()):
        raise RuntimeError(f"{op}: t must be in [0, {timesteps}), got {t.tolist()}")
    available = gt_counts.clamp(min=1)[:, None]
    if bool(((select_index < -1) | (select_index >= available)).any()):
        raise RuntimeError(f"{op}: select_index must be -1 or in [0, max(gt_counts[b], 1)) for every image")
    _check_finite(op, noise=noise, placeholder_noise=placeholder_noise, images_whwh=images_whwh)
    schedule = torch.stack([sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod])
    if not bool(((schedule >= 0) & (schedule <= 1)).all()):
        raise RuntimeError(f"{op}: the schedule must hold values in [0, 1]")
    _check_sizes(op, images_whwh)


def _check_finite(op: str, **tensors: Tensor) -> None:
    for name, x in tensors.items():
        if not bool(torch.isfinite(x).all()):
            raise RuntimeError(f"{op}: {name} must be finite")


def _check_sizes(op: str, images_whwh: Tensor) -> None:
    if not bool((images_whwh > 0).all()):
        raise RuntimeError(f"{op}: images_whwh must hold positive sizes")


def _check_ddim_values(x_t, pred_boxes, images_whwh, t, t_next, alphas_cumprod, eta, noise, renew_noise) -> None:
    """Synchronising value checks for CUDA (the CPU kernel makes them itself)."""
    op = "ddim_step_boxes"
    _check_finite(op, x_t=x_t, pred_boxes=pred_boxes, images_whwh=images_whwh, noise=noise, renew_noise=renew_noise)
    _check_sizes(op, images_whwh)
    alpha = float(alphas_cumprod[t])
    alpha_next = float(alphas_cumprod[t_next]) if t_next >= 0 else 1.0
    if not 0 < alpha < 1 or not 0 < alpha_next <= 1:
        raise RuntimeError(f"{op}: alphas_cumprod[t] must be in (0, 1) and alphas_cumprod[t_next] in (0, 1], "
                           f"got {alpha} and {alpha_next}")
    sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)) ** 0.5
    if 1 - alpha_next - sigma**2 < 0:
        raise RuntimeError(f"{op}: eta = {eta} is too large for the step {t} -> {t_next}")


def _ddim_args_ok(x_t, pred_boxes, images_whwh, keep, t, t_next, alphas_cumprod, eta, scale, noise,
                  renew_noise) -> bool:
    """Fast path of the argument checks: True when every check of :func:`_check_ddim_args` passes."""
    try:
        shape = x_t.shape
        batch, proposals, four = shape
        device = x_t.device
        return (four == 4 and pred_boxes.shape == shape and noise.shape == shape and renew_noise.shape == shape
                and keep.shape == (batch, proposals) and keep.dtype == torch.bool
                and images_whwh.shape == (batch, 4) and alphas_cumprod.dim() == 1
                and type(t) is int and type(t_next) is int and 0 <= t < alphas_cumprod.shape[0] and -1 <= t_next < t
                and type(eta) in (int, float) and 0 <= eta < float("inf")
                and type(scale) in (int, float) and 0 < scale < float("inf")
                and all(x.is_floating_point() and x.device == device
                        for x in (x_t, pred_boxes, noise, renew_noise, alphas_cumprod, images_whwh))
                and keep.device == device)
    except (AttributeError, TypeError, ValueError, IndexError):
        return False


def _check_ddim_args(x_t, pred_boxes, images_whwh, keep, t, t_next, alphas_cumprod, eta, scale, noise,
                     renew_noise) -> None:
    """The argument checks with messages naming the argument (run when the fast path fails)."""
    op = "ddim_step_boxes"
    _boxes(op, "x_t", x_t)
    batch, proposals = x_t.shape[:2]
    _boxes(op, "pred_boxes", pred_boxes, batch, proposals)
    _boxes(op, "noise", noise, batch, proposals)
    _boxes(op, "renew_noise", renew_noise, batch, proposals)
    _checks.require_tensor(op, "keep", keep)
    if tuple(keep.shape) != (batch, proposals) or keep.dtype != torch.bool:
        raise ValueError(f"{op}: keep must be bool [B, N] = [{batch}, {proposals}], "
                         f"got {keep.dtype} {tuple(keep.shape)}")
    _checks.require_tensor(op, "images_whwh", images_whwh)
    _checks.require_floating(op, "images_whwh", images_whwh)
    if tuple(images_whwh.shape) != (batch, 4):
        raise ValueError(f"{op}: images_whwh must be [B, 4] = [{batch}, 4], got {tuple(images_whwh.shape)}")
    _schedule(op, "alphas_cumprod", alphas_cumprod)
    _checks.integer(op, "t", t)
    _checks.integer(op, "t_next", t_next)
    timesteps = alphas_cumprod.shape[0]
    if not 0 <= t < timesteps:
        raise ValueError(f"{op}: t must be in [0, {timesteps}), got {t}")
    if not -1 <= t_next < t:
        raise ValueError(f"{op}: t_next must be in [-1, t = {t}) (-1 = the final step), got {t_next}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < float("inf"):
        raise ValueError(f"{op}: eta must be a finite number >= 0, got {eta!r}")
    _checks.positive_float(op, "scale", scale)
    _same_device(op, "x_t", x_t, pred_boxes=pred_boxes, images_whwh=images_whwh, keep=keep,
                 alphas_cumprod=alphas_cumprod, noise=noise, renew_noise=renew_noise)


def ddim_step_boxes(x_t: Tensor, pred_boxes: Tensor, images_whwh: Tensor, keep: Tensor, t: int, t_next: int,
                    alphas_cumprod: Tensor, eta: float, scale: float, noise: Tensor,
                    renew_noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One DDIM step from ``t`` to ``t_next`` with box renewal (docs/official-model.md §3.4), any batch size.

    Args:
        x_t: ``[B, N, 4]`` the current state in the diffusion space.
        pred_boxes: ``[B, N, 4]`` the head's last-stage boxes, absolute xyxy.
        images_whwh: ``[B, 4]`` (w, h, w, h) of the unpadded images.
        keep: ``[B, N]`` bool, proposals kept by renewal (max class score > threshold; all True
            without renewal).
        t, t_next: current and next step; ``t_next = -1`` is the final step.
        alphas_cumprod: ``[T]`` ᾱ (float64).
        eta: DDIM stochasticity (1.0 in DiffusionDet).
        scale: signal scale (2.0).
        noise: ``[B, N, 4]`` standard-normal draws; compacted slot p uses ``noise[b, p]``.
        renew_noise: ``[B, N, 4]`` standard-normal draws; refilled slot p (``p >= num_kept[b]``)
            becomes ``renew_noise[b, p]``.

    Returns:
        ``(x_next, x0, next_boxes, num_kept)``: ``x_next [B, N, 4]`` the next state (kept
        proposals first, in order, then the fresh ones; ``x0`` itself when ``t_next < 0``);
        ``x0 [B, N, 4]`` x̂0 of every proposal in its original slot; ``next_boxes [B, N, 4]``
        the head input of the next step (absolute xyxy); ``num_kept [B]`` int64. Float64 boxes.
    """
    op = "ddim_step_boxes"
    if not _ddim_args_ok(x_t, pred_boxes, images_whwh, keep, t, t_next, alphas_cumprod, eta, scale, noise,
                         renew_noise):
        _check_ddim_args(x_t, pred_boxes, images_whwh, keep, t, t_next, alphas_cumprod, eta, scale, noise,
                         renew_noise)
    scale = float(scale)
    if x_t.device.type != "cpu" and _dispatch.input_checks_enabled():
        _check_ddim_values(x_t, pred_boxes, images_whwh, t, t_next, alphas_cumprod, eta, noise, renew_noise)
    if _dispatch.resolve(op, x_t.device.type) == "reference":
        return reference.box_diffusion.ddim_step_boxes(x_t, pred_boxes, images_whwh, keep, t, t_next, alphas_cumprod,
                                                       float(eta), scale, noise, renew_noise)
    return torch.ops.fastdiffinst.ddim_step_boxes(x_t, pred_boxes, images_whwh, keep, t, t_next, alphas_cumprod,
                                                  float(eta), scale, noise, renew_noise)


class QSampleDraws(NamedTuple):
    """The random inputs of :func:`q_sample_boxes`."""

    t: Tensor                  # [B] int64
    noise: Tensor              # [B, N, 4]
    placeholder_noise: Tensor  # [B, N, 4]
    select_index: Tensor       # [B, N] int64


def draw_q_sample_inputs(gt_counts: Tensor | list[int], num_proposals: int, generator: torch.Generator | None = None,
                         timesteps: int = NUM_TIMESTEPS, device: torch.device | str | None = None) -> QSampleDraws:
    """Draws the random inputs of :func:`q_sample_boxes` from ``generator``, with fixed shapes.

    ``t ~ U{0, …, T−1}`` per image; ``noise`` and ``placeholder_noise`` standard normal
    ``[B, N, 4]``; ``select_index``: GT boxes first in order, then placeholders (-1); the fake box
    (index 0) for an image without GT; a uniformly random subset of N GT boxes, kept in their order,
    when an image has more than N. Draws are made on the generator's device and moved to ``device``.
    """
    op = "draw_q_sample_inputs"
    counts = gt_counts.tolist() if isinstance(gt_counts, Tensor) else list(gt_counts)
    if any(not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"{op}: gt_counts must be non-negative integers, got {counts}")
    if not isinstance(num_proposals, int) or num_proposals < 1:
        raise ValueError(f"{op}: num_proposals must be a positive int, got {num_proposals!r}")
    source = generator.device if generator is not None else torch.device("cpu")
    batch = len(counts)
    t = torch.randint(0, timesteps, (batch,), generator=generator, device=source)
    noise = torch.randn(batch, num_proposals, 4, generator=generator, device=source)
    placeholder_noise = torch.randn(batch, num_proposals, 4, generator=generator, device=source)
    select_index = torch.full((batch, num_proposals), -1, dtype=torch.int64, device=source)
    for b, count in enumerate(counts):
        if count > num_proposals:
            chosen = torch.randperm(count, generator=generator, device=source)[:num_proposals]
            select_index[b] = chosen.sort().values
        else:
            n = max(count, 1)  # an image without GT keeps one fake box
            select_index[b, :n] = torch.arange(n, device=source)
    draws = QSampleDraws(t, noise, placeholder_noise, select_index)
    return QSampleDraws(*(d.to(device) for d in draws)) if device is not None else draws


def draw_ddim_noise(batch: int, num_proposals: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(noise, renew_noise) for :func:`ddim_step_boxes`: standard normal ``[B, N, 4]`` each."""
    source = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(batch, num_proposals, 4, generator=generator, device=source)
    renew_noise = torch.randn(batch, num_proposals, 4, generator=generator, device=source)
    return (noise.to(device), renew_noise.to(device)) if device is not None else (noise, renew_noise)


def _register() -> None:
    @torch.library.register_fake("fastdiffinst::q_sample_boxes")
    def _q_sample_fake(gt_boxes, gt_counts, t, noise, placeholder_noise, select_index, sqrt_alphas_cumprod,
                       sqrt_one_minus_alphas_cumprod, scale, images_whwh):
        return noise.new_empty(noise.shape, dtype=torch.float64)

    @torch.library.register_fake("fastdiffinst::ddim_step_boxes")
    def _ddim_fake(x_t, pred_boxes, images_whwh, keep, t, t_next, alphas_cumprod, eta, scale, noise, renew_noise):
        boxes = [x_t.new_empty(x_t.shape, dtype=torch.float64) for _ in range(3)]
        return boxes[0], boxes[1], boxes[2], x_t.new_empty((x_t.shape[0],), dtype=torch.int64)


if _extension.has_ops():
    _register()
