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

import torch
from torch import Tensor

from fastdiffinst import _extension, reference
from fastdiffinst.common.diffusion import NUM_TIMESTEPS, SIGNAL_SCALE, DiffusionSchedule, QSampleDraws
from fastdiffinst.ops import _checks, _dispatch

_Q_SAMPLE = "q_sample_boxes"
_DDIM_STEP = "ddim_step_boxes"
_BACKENDS = {"cpp": "fastdiffinst._C kernels (C++ on CPU, CUDA on GPU)",
             "reference": "batched plain PyTorch (fastdiffinst.reference.box_diffusion)"}
_dispatch.register_op(_Q_SAMPLE, _BACKENDS)
_dispatch.register_op(_DDIM_STEP, _BACKENDS)


def _check_images_whwh(op: str, images_whwh: object, batch: int) -> None:
    _checks.require_shape(op, "images_whwh", images_whwh, (batch, 4), "[B, 4]")
    _checks.require_floating(op, "images_whwh", images_whwh)


def _check_q_sample_args(gt_boxes: Tensor, gt_counts: Tensor, images_whwh: Tensor, draws: QSampleDraws,
                         schedule: DiffusionSchedule, scale: float) -> tuple[Tensor, Tensor, float]:
    """Shapes, dtypes, devices and scalars (the kernels check the values); returns the two schedule
    buffers and ``scale`` as a float."""
    op = _Q_SAMPLE
    _checks.require_boxes(op, "gt_boxes", gt_boxes, layout="[B, G, 4]")
    batch = gt_boxes.shape[0]
    _checks.require_vector(op, "gt_counts", gt_counts, batch, torch.int64)
    _check_images_whwh(op, images_whwh, batch)
    if not isinstance(draws, QSampleDraws):
        raise TypeError(f"{op}: draws must be a QSampleDraws (t, noise, placeholder_noise, select_index), "
                        f"got {type(draws).__name__}")
    _checks.require_vector(op, "draws.t", draws.t, batch, torch.int64)
    _checks.require_boxes(op, "draws.noise", draws.noise, batch)
    proposals = draws.noise.shape[1]
    _checks.require_boxes(op, "draws.placeholder_noise", draws.placeholder_noise, batch, proposals)
    _checks.require_shape(op, "draws.select_index", draws.select_index, (batch, proposals), "[B, N]", torch.int64)
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = _checks.require_schedule(
        op, schedule, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
    scale = _checks.positive_float(op, "scale", scale)
    _checks.require_same_devices(op, {
        "gt_boxes": gt_boxes, "gt_counts": gt_counts, "images_whwh": images_whwh, "draws.t": draws.t,
        "draws.noise": draws.noise, "draws.placeholder_noise": draws.placeholder_noise,
        "draws.select_index": draws.select_index, "schedule.sqrt_alphas_cumprod": sqrt_alphas_cumprod,
        "schedule.sqrt_one_minus_alphas_cumprod": sqrt_one_minus_alphas_cumprod})
    return sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, scale


def q_sample_boxes(gt_boxes: Tensor, gt_counts: Tensor, images_whwh: Tensor, *, draws: QSampleDraws,
                   schedule: DiffusionSchedule, scale: float = SIGNAL_SCALE) -> Tensor:
    """Noisy training proposals from padded GT boxes (docs/official-model.md §3.3), all images at once.

    Args:
        gt_boxes: ``[B, G, 4]`` normalised (cx, cy, w, h); rows ``>= gt_counts[b]`` are ignored.
        gt_counts: ``[B]`` int64, GT boxes per image (0 = no annotation: the fake box (0.5, 0.5, 1, 1)).
        images_whwh: ``[B, 4]`` (w, h, w, h) of the unpadded images.
        draws: the random inputs (:func:`draw_q_sample_inputs`): ``t [B]`` int64 diffusion step per
            image, in ``[0, T)``; ``noise [B, N, 4]`` standard-normal draws ε;
            ``placeholder_noise [B, N, 4]`` standard-normal draws, slot i of image b, when a
            placeholder, being ``placeholder_noise[b, i] / 6 + 0.5`` with w, h >= 1e-4;
            ``select_index [B, N]`` int64, slot i taking GT ``select_index[b, i]`` (0 for the fake
            box of an image without GT), or a placeholder when -1.
        schedule: the diffusion schedule (:func:`cosine_schedule`); its ``sqrt_alphas_cumprod`` and
            ``sqrt_one_minus_alphas_cumprod`` are read.
        scale: signal scale (2.0).

    Returns:
        ``[B, N, 4]`` float64 noisy boxes, absolute xyxy:
        ``decode(clamp(sqrt(ᾱ_t)·(x0·2 − 1)·scale + sqrt(1 − ᾱ_t)·ε))``.
    """
    native_first = (isinstance(gt_boxes, Tensor) and isinstance(draws, QSampleDraws)
                    and isinstance(schedule, DiffusionSchedule)
                    and _dispatch.native_first(_Q_SAMPLE, gt_boxes.device.type))
    if not native_first:
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, scale = _check_q_sample_args(
            gt_boxes, gt_counts, images_whwh, draws, schedule, scale)
        if gt_boxes.device.type != "cpu" and _dispatch.input_checks_enabled():
            _check_q_sample_values(gt_boxes, gt_counts, images_whwh, draws, sqrt_alphas_cumprod,
                                   sqrt_one_minus_alphas_cumprod)
        if _dispatch.resolve(_Q_SAMPLE, gt_boxes.device.type) == "reference":
            return reference.box_diffusion.q_sample_boxes(gt_boxes, gt_counts, images_whwh, draws=draws,
                                                          schedule=schedule, scale=scale)
    try:
        return torch.ops.fastdiffinst.q_sample_boxes.default(
            gt_boxes, gt_counts, draws.t, draws.noise, draws.placeholder_noise, draws.select_index,
            schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod,
            _checks.positive_float(_Q_SAMPLE, "scale", scale), images_whwh)
    except (RuntimeError, TypeError) as error:
        if not native_first:
            raise
        refused = error
    # The kernel refused an argument: the checks name it (outside the handler, so that their error
    # does not come chained to the kernel's); a value error of the kernel passes them.
    _check_q_sample_args(gt_boxes, gt_counts, images_whwh, draws, schedule, scale)
    raise refused


def _check_q_sample_values(gt_boxes: Tensor, gt_counts: Tensor, images_whwh: Tensor, draws: QSampleDraws,
                           sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor) -> None:
    """Synchronising value checks for CUDA, with the CPU kernel's messages, which name the Python
    arguments (``draws.t``; the CPU kernel makes these checks itself)."""
    op = _Q_SAMPLE
    max_gt, timesteps = gt_boxes.shape[1], sqrt_alphas_cumprod.shape[0]
    bad = _checks.first_out_of_range(gt_counts, 0, max_gt + 1)
    if bad is not None:
        raise RuntimeError(f"{op}: gt_counts[{bad[0]}] must be in [0, G = {max_gt}], got {int(gt_counts[bad])}")
    bad = _checks.first_out_of_range(draws.t, 0, timesteps)
    if bad is not None:
        raise RuntimeError(f"{op}: draws.t[{bad[0]}] must be in [0, {timesteps}), got {int(draws.t[bad])}")
    available = gt_counts.clamp(min=1)[:, None]  # an image without GT has one (fake) box, index 0
    bad = _checks.first_out_of_range(draws.select_index, -1, available)
    if bad is not None:
        raise RuntimeError(f"{op}: draws.select_index[{bad[0]}, {bad[1]}] must be -1 or in "
                           f"[0, {int(available[bad[0]])}), got {int(draws.select_index[bad])}")
    _check_finite(op, {"draws.noise": draws.noise, "draws.placeholder_noise": draws.placeholder_noise,
                       "images_whwh": images_whwh})
    buffers = torch.stack([sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod])
    if not bool(((buffers >= 0) & (buffers <= 1)).all()):
        raise RuntimeError(f"{op}: the schedule must hold values in [0, 1]")
    _check_sizes(op, images_whwh)


def _check_finite(op: str, tensors: dict[str, Tensor]) -> None:
    for name, x in tensors.items():
        if not bool(torch.isfinite(x).all()):
            raise RuntimeError(f"{op}: {name} must be finite")


def _check_sizes(op: str, images_whwh: Tensor) -> None:
    if not bool((images_whwh > 0).all()):
        raise RuntimeError(f"{op}: images_whwh must hold positive sizes")


def _check_ddim_step_args(x_t: Tensor, images_whwh: Tensor, pred_boxes: Tensor, keep: Tensor, t: int, t_next: int,
                          schedule: DiffusionSchedule, noise: Tensor, renew_noise: Tensor, eta: float,
                          scale: float) -> tuple[Tensor, float, float]:
    """Shapes, dtypes, devices and scalars (the kernels check the values); returns
    ``schedule.alphas_cumprod``, ``eta`` and ``scale`` as floats."""
    op = _DDIM_STEP
    _checks.require_boxes(op, "x_t", x_t)
    batch, proposals = x_t.shape[:2]
    _check_images_whwh(op, images_whwh, batch)
    _checks.require_boxes(op, "pred_boxes", pred_boxes, batch, proposals)
    _checks.require_shape(op, "keep", keep, (batch, proposals), "[B, N]", torch.bool)
    _checks.require_boxes(op, "noise", noise, batch, proposals)
    _checks.require_boxes(op, "renew_noise", renew_noise, batch, proposals)
    (alphas_cumprod,) = _checks.require_schedule(op, schedule, "alphas_cumprod")
    eta, scale = _check_ddim_scalars(t, t_next, eta, scale)
    timesteps = alphas_cumprod.shape[0]
    if not 0 <= t < timesteps:
        raise ValueError(f"{op}: t must be in [0, {timesteps}), got {t}")
    if not -1 <= t_next < t:
        raise ValueError(f"{op}: t_next must be in [-1, t = {t}) (-1 = the final step), got {t_next}")
    _checks.require_same_devices(op, {
        "x_t": x_t, "images_whwh": images_whwh, "pred_boxes": pred_boxes, "keep": keep, "noise": noise,
        "renew_noise": renew_noise, "schedule.alphas_cumprod": alphas_cumprod})
    return alphas_cumprod, eta, scale


def _check_ddim_scalars(t: int, t_next: int, eta: float, scale: float) -> tuple[float, float]:
    """The types of the step numbers (the native op would take a bool for an int) and the values of
    ``eta`` and ``scale``, returned as floats."""
    op = _DDIM_STEP
    _checks.integer(op, "t", t)
    _checks.integer(op, "t_next", t_next)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < float("inf"):
        raise ValueError(f"{op}: eta must be a finite number >= 0, got {eta!r}")
    return float(eta), _checks.positive_float(op, "scale", scale)


def ddim_step_boxes(x_t: Tensor, images_whwh: Tensor, *, pred_boxes: Tensor, keep: Tensor, t: int, t_next: int,
                    schedule: DiffusionSchedule, noise: Tensor, renew_noise: Tensor, eta: float = 1.0,
                    scale: float = SIGNAL_SCALE) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One DDIM step from ``t`` to ``t_next`` with box renewal (docs/official-model.md §3.4), any batch size.

    Args:
        x_t: ``[B, N, 4]`` the current state in the diffusion space.
        images_whwh: ``[B, 4]`` (w, h, w, h) of the unpadded images.
        pred_boxes: ``[B, N, 4]`` the head's last-stage boxes, absolute xyxy.
        keep: ``[B, N]`` bool, proposals kept by renewal (max class score > threshold; all True
            without renewal).
        t, t_next: current and next step; ``t_next = -1`` is the final step.
        schedule: the diffusion schedule (:func:`cosine_schedule`); its ``alphas_cumprod`` ᾱ is read.
        noise: ``[B, N, 4]`` standard-normal draws; compacted slot p uses ``noise[b, p]``.
        renew_noise: ``[B, N, 4]`` standard-normal draws; refilled slot p (``p >= num_kept[b]``)
            becomes ``renew_noise[b, p]`` (:func:`draw_ddim_noise` draws both).
        eta: DDIM stochasticity (1.0 in DiffusionDet).
        scale: signal scale (2.0).

    Returns:
        ``(x_next, x0, next_boxes, num_kept)``: ``x_next [B, N, 4]`` the next state (kept
        proposals first, in order, then the fresh ones; ``x0`` itself when ``t_next < 0``);
        ``x0 [B, N, 4]`` x̂0 of every proposal in its original slot; ``next_boxes [B, N, 4]``
        the head input of the next step (absolute xyxy); ``num_kept [B]`` int64. Float64 boxes.
    """
    native_first = (isinstance(x_t, Tensor) and isinstance(schedule, DiffusionSchedule)
                    and _dispatch.native_first(_DDIM_STEP, x_t.device.type))
    if native_first:
        eta, scale = _check_ddim_scalars(t, t_next, eta, scale)
    else:
        alphas_cumprod, eta, scale = _check_ddim_step_args(x_t, images_whwh, pred_boxes, keep, t, t_next, schedule,
                                                           noise, renew_noise, eta, scale)
        if x_t.device.type != "cpu" and _dispatch.input_checks_enabled():
            _check_ddim_step_values(x_t, images_whwh, pred_boxes, t, t_next, alphas_cumprod, eta, noise, renew_noise)
        if _dispatch.resolve(_DDIM_STEP, x_t.device.type) == "reference":
            return reference.box_diffusion.ddim_step_boxes(x_t, images_whwh, pred_boxes=pred_boxes, keep=keep, t=t,
                                                           t_next=t_next, schedule=schedule, noise=noise,
                                                           renew_noise=renew_noise, eta=eta, scale=scale)
    try:
        return torch.ops.fastdiffinst.ddim_step_boxes.default(x_t, pred_boxes, images_whwh, keep, t, t_next,
                                                              schedule.alphas_cumprod, eta, scale, noise, renew_noise)
    except (RuntimeError, TypeError) as error:
        if not native_first:
            raise
        refused = error
    # As in q_sample_boxes: the checks name a refused argument; a value error of the kernel passes them.
    _check_ddim_step_args(x_t, images_whwh, pred_boxes, keep, t, t_next, schedule, noise, renew_noise, eta, scale)
    raise refused


def _check_ddim_step_values(x_t: Tensor, images_whwh: Tensor, pred_boxes: Tensor, t: int, t_next: int,
                            alphas_cumprod: Tensor, eta: float, noise: Tensor, renew_noise: Tensor) -> None:
    """Synchronising value checks for CUDA (the CPU kernel makes them itself)."""
    op = _DDIM_STEP
    _check_finite(op, {"x_t": x_t, "pred_boxes": pred_boxes, "images_whwh": images_whwh, "noise": noise,
                       "renew_noise": renew_noise})
    _check_sizes(op, images_whwh)
    alpha = float(alphas_cumprod[t])
    alpha_next = float(alphas_cumprod[t_next]) if t_next >= 0 else 1.0
    if not 0 < alpha < 1 or not 0 < alpha_next <= 1:
        raise RuntimeError(f"{op}: alphas_cumprod[t] must be in (0, 1) and alphas_cumprod[t_next] in (0, 1], "
                           f"got {alpha} and {alpha_next}")
    sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)) ** 0.5
    if 1 - alpha_next - sigma**2 < 0:
        raise RuntimeError(f"{op}: eta = {eta} is too large for the step {t} -> {t_next}")


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
    @torch.library.register_fake(f"fastdiffinst::{_Q_SAMPLE}")
    def _q_sample_fake(gt_boxes, gt_counts, t, noise, placeholder_noise, select_index, sqrt_alphas_cumprod,
                       sqrt_one_minus_alphas_cumprod, scale, images_whwh):
        return noise.new_empty(noise.shape, dtype=torch.float64)

    @torch.library.register_fake(f"fastdiffinst::{_DDIM_STEP}")
    def _ddim_fake(x_t, pred_boxes, images_whwh, keep, t, t_next, alphas_cumprod, eta, scale, noise, renew_noise):
        boxes = [x_t.new_empty(x_t.shape, dtype=torch.float64) for _ in range(3)]
        return boxes[0], boxes[1], boxes[2], x_t.new_empty((x_t.shape[0],), dtype=torch.int64)


if _extension.has_ops():
    _register()
