"""Box-diffusion study: the fused ops vs the official per-image formulation, our batched PyTorch
reference and its ``torch.compile`` form, on the same draws.

* q_sample_boxes: B in {2, 16}, N = 500, GT counts uniform in [0, 60] (seed 0). Both sides start
  from normalised GT boxes: per-image lists for the official code, the padded [B, G, 4] batch (as a
  collate function builds it) for the fused op and the batched reference.
* ddim_step_boxes: one step 999 -> 749, eta = 1, B in {1, 8}, N = 500, about half the proposals
  kept. The official code handles batch 1, so its baseline is a loop over the images.
"""

from __future__ import annotations

import time

import torch

from benchmarks.harness import fmt_ms, time_fn
from fastdiffinst.ops import ddim_step_boxes, draw_ddim_noise, draw_q_sample_inputs, q_sample_boxes
from fastdiffinst.reference import box_diffusion as bd

NUM_PROPOSALS, SCALE = 500, 2.0
SCHEDULE = bd.cosine_schedule()


def _gt_lists(batch, generator):
    """Per-image normalised cxcywh GT boxes, their padded batch, and the image sizes."""
    counts = torch.randint(0, 61, (batch,), generator=generator).tolist()
    boxes = [torch.rand(count, 4, generator=generator) * 0.5 + 0.2 for count in counts]
    padded = torch.zeros(batch, max(1, max(counts)), 4)
    for b, gt in enumerate(boxes):
        padded[b, :len(gt)] = gt
    whwh = torch.tensor([[1216.0 - 37 * b, 800.0 - 23 * b] * 2 for b in range(batch)])
    return counts, boxes, padded, whwh


def run(device: str, profile: str, progress) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    repeats = 10 if profile == "quick" else 20
    rows = []
    sa, s1a, ac = (x.to(device) for x in (SCHEDULE.sqrt_alphas_cumprod, SCHEDULE.sqrt_one_minus_alphas_cumprod,
                                          SCHEDULE.alphas_cumprod))
    schedule = bd.DiffusionSchedule(**{k: getattr(SCHEDULE, k).to(device) for k in bd.DiffusionSchedule.__dataclass_fields__})

    for batch in (2, 16):
        counts, boxes, padded, whwh = _gt_lists(batch, generator)
        boxes, padded, whwh = [b.to(device) for b in boxes], padded.to(device), whwh.to(device)
        draws = draw_q_sample_inputs(counts, NUM_PROPOSALS, generator, device=device)
        counts_t = torch.tensor(counts, device=device)
        args = (padded, counts_t, *draws, sa, s1a, SCALE, whwh)

        def fused():
            return q_sample_boxes(*args)

        def official():
            return bd.official_training_boxes(boxes, whwh, NUM_PROPOSALS, *draws, schedule, SCALE)

        def batched(fn):
            return lambda: fn(*args)

        err = (fused() - official()).abs().max().item()
        rows += _compare("q_sample_boxes", f"B={batch} N={NUM_PROPOSALS} GT 0-60", fused, official,
                         batched(bd.q_sample_boxes), bd.q_sample_boxes, batched, device, repeats, err, progress)

    for batch in (1, 8):
        whwh = torch.tensor([[1216.0, 800.0, 1216.0, 800.0]] * batch, device=device)
        x_t = torch.randn(batch, NUM_PROPOSALS, 4, generator=generator).to(device)
        pred = (bd.box_cxcywh_to_xyxy(torch.rand(batch, NUM_PROPOSALS, 4, generator=generator) * 0.6 + 0.2)
                .to(device) * whwh[:, None])
        keep = (torch.rand(batch, NUM_PROPOSALS, generator=generator) < 0.5).to(device)
        noise, renew = draw_ddim_noise(batch, NUM_PROPOSALS, generator, device=device)
        kept = keep.sum(1).tolist()
        args = (x_t, pred, whwh, keep, 999, 749, ac, 1.0, SCALE, noise, renew)

        def fused():
            return ddim_step_boxes(*args)

        def official():
            return [bd.official_ddim_step(x_t[b:b + 1], pred[b:b + 1], whwh[b:b + 1], keep[b], 999, 749, schedule, 1.0,
                                          noise[b:b + 1, :kept[b]], renew[b:b + 1, kept[b]:], SCALE)[0]
                    for b in range(batch)]

        def batched(fn):
            return lambda: fn(*args)

        err = max((fused()[0][b] - o[0]).abs().max().item() for b, o in enumerate(official()))
        rows += _compare("ddim_step_boxes", f"B={batch} N={NUM_PROPOSALS} 999->749", fused, official,
                         batched(bd.ddim_step_boxes), bd.ddim_step_boxes, batched, device, repeats, err, progress)
    return rows


def _compare(op, case, fused, official, reference, reference_fn, batched, device, repeats, err, progress):
    t_fused = time_fn(fused, device, repeats)
    progress.update(1)
    t_official = time_fn(official, device, repeats)
    progress.update(1)
    t_reference = time_fn(reference, device, repeats)
    progress.update(1)
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = batched(torch.compile(reference_fn, dynamic=False))
    compiled()
    compile_s = time.perf_counter() - start
    t_compiled = time_fn(compiled, device, repeats)
    progress.update(1)
    rows = []
    for baseline, t_base, note in (("official per-image", t_official, f"max abs diff {err:.1e}"),
                                   ("batched reference", t_reference, ""),
                                   ("torch.compile(reference)", t_compiled, f"compile {compile_s:.1f} s")):
        rows.append({
            "study": "box_diffusion", "op": op, "case": case, "direction": "forward", "baseline": baseline,
            "ours_ms": fmt_ms(t_fused.median_s), "ours_range_ms": f"{fmt_ms(t_fused.min_s)}-{fmt_ms(t_fused.max_s)}",
            "baseline_ms": fmt_ms(t_base.median_s),
            "baseline_range_ms": f"{fmt_ms(t_base.min_s)}-{fmt_ms(t_base.max_s)}",
            "speedup": f"{t_base.median_s / t_fused.median_s:.2f}x", "x_traffic_floor": "", "max_abs_diff": note,
            "repeats": repeats,
        })
    return rows


STEPS = 16  # timed measurements, for the progress bar
