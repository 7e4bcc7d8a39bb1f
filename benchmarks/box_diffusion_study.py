"""Box-diffusion study: the fused ops vs the official per-image formulation, our batched PyTorch
reference and its ``torch.compile`` form, on the same draws.

* q_sample_boxes: B in {2, 16}, N = 500, GT counts uniform in [0, 60] (seed 0). Both sides start
  from normalised GT boxes: per-image lists for the official code, the padded [B, G, 4] batch (as a
  collate function builds it) for the fused op and the batched reference.
* ddim_step_boxes: one step 999 -> 749, eta = 1, B in {1, 8}, N = 500, about half the proposals
  kept. The official code handles batch 1, so its baseline is a loop over the images.

The smoke profile (tests) runs the same code with N = 20 and batches {2} / {1}. Throughput: the
bytes the fused op reads and writes over its time, against the copy bandwidth of the same run
(these ops are small: their time is per-call overhead, which the percentage makes plain).

Each fused call's time is also split into host and kernel time (:func:`per_call_split`; the
``host_us``, ``kernel_us`` and ``launches`` fields and the notes of the fused rows).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.harness import comparison_row, rate_note, synchronize, time_fn
from fastdiffinst.common.boxes import box_cxcywh_to_xyxy
from fastdiffinst.common.diffusion import DiffusionSchedule, cosine_schedule
from fastdiffinst.ops import ddim_step_boxes, draw_ddim_noise, draw_q_sample_inputs, q_sample_boxes
from fastdiffinst.reference import box_diffusion as bd

SCALE = 2.0
SCHEDULE = cosine_schedule()


@dataclass(frozen=True)
class Sizes:
    proposals: int
    q_sample_batches: tuple[int, ...]
    ddim_batches: tuple[int, ...]
    repeats: int
    warmup: int = 2
    split_calls: int = 200  # calls per round of the host/kernel split (per_call_split)


PROFILES = {"smoke": Sizes(20, (2,), (1,), 1, 0, 5), "quick": Sizes(500, (2, 16), (1, 8), 10),
            "full": Sizes(500, (2, 16), (1, 8), 20)}


def _gt_lists(batch, generator):
    """Per-image normalised cxcywh GT boxes, their padded batch, and the image sizes."""
    counts = torch.randint(0, 61, (batch,), generator=generator).tolist()
    boxes = [torch.rand(count, 4, generator=generator) * 0.5 + 0.2 for count in counts]
    padded = torch.zeros(batch, max(1, max(counts)), 4)
    for b, gt in enumerate(boxes):
        padded[b, :len(gt)] = gt
    whwh = torch.tensor([[1216.0 - 37 * b, 800.0 - 23 * b] * 2 for b in range(batch)])
    return counts, boxes, padded, whwh


def run(device: str, profile: str, progress, ceilings: dict) -> list[dict]:
    sizes = PROFILES[profile]
    num = sizes.proposals
    generator = torch.Generator().manual_seed(0)
    rows = []
    schedule = DiffusionSchedule(**{k: getattr(SCHEDULE, k).to(device)
                                       for k in DiffusionSchedule.__dataclass_fields__})

    for batch in sizes.q_sample_batches:
        counts, boxes, padded, whwh = _gt_lists(batch, generator)
        boxes, padded, whwh = [b.to(device) for b in boxes], padded.to(device), whwh.to(device)
        draws = draw_q_sample_inputs(counts, num, generator, device=device)
        args = (padded, torch.tensor(counts, device=device), whwh)
        kwargs = dict(draws=draws, schedule=schedule, scale=SCALE)

        # The timed closures run within this iteration; their inputs are bound explicitly all the same.
        def fused(args=args, kwargs=kwargs):
            return q_sample_boxes(*args, **kwargs)

        def official(boxes=boxes, whwh=whwh, kwargs=kwargs):
            return bd.official_training_boxes(boxes, whwh, **kwargs)

        def batched(fn, args=args, kwargs=kwargs):
            return lambda: fn(*args, **kwargs)

        def native(args=args, draws=draws, schedule=schedule):
            return torch.ops.fastdiffinst.q_sample_boxes.default(
                *args[:2], *draws, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, SCALE,
                args[2])

        err = (fused() - official()).abs().max().item()
        # Reads the GT batch and the draws, writes [B, N, 4] fp64.
        traffic = sum(t.numel() * t.element_size() for t in (padded, *draws)) + batch * num * 32
        rows += _compare("q_sample_boxes", f"B={batch} N={num} GT 0-60", fused, official,
                         batched(bd.q_sample_boxes), bd.q_sample_boxes, batched, device, sizes, err, traffic,
                         ceilings, progress, per_call_split(fused, native, device, sizes.split_calls))

    for batch in sizes.ddim_batches:
        whwh = torch.tensor([[1216.0, 800.0, 1216.0, 800.0]] * batch, device=device)
        x_t = torch.randn(batch, num, 4, generator=generator).to(device)
        pred = (box_cxcywh_to_xyxy(torch.rand(batch, num, 4, generator=generator) * 0.6 + 0.2)
                .to(device) * whwh[:, None])
        keep = (torch.rand(batch, num, generator=generator) < 0.5).to(device)
        noise, renew = draw_ddim_noise(batch, num, generator, device=device)
        args = (x_t, whwh)
        kwargs = dict(pred_boxes=pred, keep=keep, t=999, t_next=749, schedule=schedule, noise=noise, renew_noise=renew,
                      eta=1.0, scale=SCALE)

        def fused(args=args, kwargs=kwargs):
            return ddim_step_boxes(*args, **kwargs)

        def official(args=args, kwargs=kwargs):
            return bd.official_ddim_step_batch(*args, **kwargs)

        def batched(fn, args=args, kwargs=kwargs):
            return lambda: fn(*args, **kwargs)

        def native(x_t=x_t, whwh=whwh, pred=pred, keep=keep, noise=noise, renew=renew, schedule=schedule):
            return torch.ops.fastdiffinst.ddim_step_boxes.default(x_t, pred, whwh, keep, 999, 749,
                                                                  schedule.alphas_cumprod, 1.0, SCALE, noise, renew)

        err = (fused()[0] - official()[0]).abs().max().item()
        # Reads x_t, the predictions, keep and the draws; writes x_next, x0 and the next boxes (fp64).
        traffic = sum(t.numel() * t.element_size() for t in (x_t, pred, keep, noise, renew)) + 3 * batch * num * 32
        rows += _compare("ddim_step_boxes", f"B={batch} N={num} 999->749", fused, official,
                         batched(bd.ddim_step_boxes), bd.ddim_step_boxes, batched, device, sizes, err, traffic,
                         ceilings, progress, per_call_split(fused, native, device, sizes.split_calls))
    return rows


def per_call_split(fused: Callable[[], object], native: Callable[[], object], device: str, calls: int) -> dict:
    """One fused call's time split in two (wall times: medians of 5 rounds of ``calls`` calls each):

    * CUDA: ``host_us``, the wall time per call of calls issued back to back without waiting for the
      GPU (the host's cost: Python, the dispatcher, allocations, launches; the GPU keeps up unless
      its kernels take longer); ``kernel_us`` and ``launches``, the device time and the number of the
      GPU activities (kernels, copies, fills) per call, from one profiled round of ``calls`` calls.
    * CPU: ``host_us``, the Python layer (the fused call minus its native op, ``native``);
      ``kernel_us``, the native op (the C++ kernel with its dispatch); ``launches`` is None.
    """
    def per_call_us(fn, sync):
        rounds = []
        for _ in range(5):
            fn()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if sync:
                synchronize(device)
            rounds.append((time.perf_counter() - start) / calls * 1e6)
        return statistics.median(rounds)

    if not device.startswith("cuda"):
        op_us = per_call_us(native, True)
        return {"host_us": max(per_call_us(fused, True) - op_us, 0.0), "kernel_us": op_us, "launches": None}
    host_us = per_call_us(fused, False)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(calls):
            fused()
        synchronize(device)
    on_gpu = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"host_us": host_us, "kernel_us": sum(e.device_time for e in on_gpu) / calls,
            "launches": len(on_gpu) / calls}


def _split_note(split: dict) -> str:
    launches = "" if split["launches"] is None else f", {split['launches']:g} GPU activities"
    return f"per call: host {split['host_us']:.1f} µs, kernel {split['kernel_us']:.1f} µs{launches}"


def _compare(op, case, fused, official, reference, reference_fn, batched, device, sizes, err, traffic, ceilings,
             progress, split):
    t_fused = time_fn(fused, device, sizes.repeats, sizes.warmup)
    progress.update(1)
    t_official = time_fn(official, device, sizes.repeats, sizes.warmup)
    progress.update(1)
    t_reference = time_fn(reference, device, sizes.repeats, sizes.warmup)
    progress.update(1)
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = batched(torch.compile(reference_fn, dynamic=False))
    compiled()
    compile_s = time.perf_counter() - start
    t_compiled = time_fn(compiled, device, sizes.repeats, sizes.warmup)
    progress.update(1)
    achieved = traffic / t_fused.median_s / 1e9
    rate = rate_note(achieved, "GB/s", ceilings["copy_GBps"], "copy")
    return [comparison_row("box_diffusion", op, case, "forward", baseline, t_fused, t_base, ours_rate=rate,
                           achieved_GBps=achieved, max_abs_diff=note, **split)
            for baseline, t_base, note in (("official per-image", t_official,
                                            f"max abs diff {err:.1e}; {_split_note(split)}"),
                                           ("batched reference", t_reference, ""),
                                           ("torch.compile(reference)", t_compiled, f"compile {compile_s:.1f} s"))]


def steps(profile: str) -> int:
    """Timed measurements, for the progress bar."""
    sizes = PROFILES[profile]
    return 4 * (len(sizes.q_sample_batches) + len(sizes.ddim_batches))
