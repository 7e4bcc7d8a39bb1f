"""RoIAlign study: our kernels vs torchvision, single-level and multi-level, forward and
forward+backward (fp32, inputs NCHW as the model produces them; conversions counted).

* single-level: C = 256, a 200x304 map (P2 of 800x1216), K = 1000 boxes, 7x7, sampling 2, aligned;
  baseline ``torchvision.ops.roi_align``.
* multi-level: B = 2, 500 boxes per image with sqrt(area) log-uniform in [16, 800] px and aspect
  log-uniform in [1/3, 3] (seed 0), C = 256, P2-P5 of 800x1216; baseline the per-level loop of
  detectron2's ROIPooler over ``torchvision.ops.roi_align`` (level rule, nonzero, index_put).

Traffic model: every bilinear tap read as one C-vector of fp32 = K * PH*PW * grid^2 * 4 * C * 4 bytes;
its floor is that traffic at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import math

import torch

from benchmarks.harness import copy_bandwidth, fmt_ms, time_fn
from fastdiffinst.ops import multilevel_roi_align, roi_align
from fastdiffinst.reference import assign_fpn_levels

IMAGE_H, IMAGE_W = 800, 1216
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
OUTPUT, SAMPLING, CHANNELS = 7, 2, 256


def detection_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` xyxy boxes: sqrt(area) log-uniform in [16, 800], aspect log-uniform in [1/3, 3]."""
    size = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(16), math.log(800), generator=generator))
    aspect = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1 / 3), math.log(3), generator=generator))
    w, h = size * aspect.sqrt(), size / aspect.sqrt()
    cx = torch.rand(n, dtype=torch.float64, generator=generator) * IMAGE_W
    cy = torch.rand(n, dtype=torch.float64, generator=generator) * IMAGE_H
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1).float()


def torchvision_pooler(features, rois):
    """detectron2 ROIPooler as the official code runs it, on torchvision's kernel."""
    import torchvision

    levels = assign_fpn_levels(rois[:, 1:], 2, 5)
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], OUTPUT, OUTPUT))
    for level, (feats, scale) in enumerate(zip(features, SCALES)):
        index = torch.nonzero(levels == level).squeeze(1)
        out = out.index_put((index,), torchvision.ops.roi_align(feats, rois[index], OUTPUT, scale, SAMPLING, True))
    return out


def _fwd_bwd(fn, features, rois, grad):
    for f in features:
        f.grad = None
    fn(features, rois).backward(grad)


def run(device: str, profile: str, progress) -> list[dict]:
    import torchvision

    generator = torch.Generator().manual_seed(0)
    repeats = 5 if profile == "quick" else 10
    bandwidth = copy_bandwidth(device)
    rows = []

    # Single level.
    k = 1000
    feats = torch.randn(1, CHANNELS, IMAGE_H // 4, IMAGE_W // 4, generator=generator).to(device)
    rois = torch.cat([torch.zeros(k, 1), detection_boxes(k, generator)], dim=1).to(device)
    grad = torch.randn(k, CHANNELS, OUTPUT, OUTPUT, generator=generator).to(device)
    single = {
        "ours": lambda f, r: roi_align(f[0], r, OUTPUT, 0.25, SAMPLING, True),
        "torchvision": lambda f, r: torchvision.ops.roi_align(f[0], r, OUTPUT, 0.25, SAMPLING, True),
    }
    rows += _compare("roi_align", f"C={CHANNELS} 200x304 K={k}", single, [feats], rois, grad, device, repeats,
                     bandwidth, progress)
    # Backward alone: the two registered backward ops on the same gradient.
    args = (grad, rois, 0.25, OUTPUT, OUTPUT, 1, CHANNELS, feats.shape[2], feats.shape[3], SAMPLING, True)
    t_ours = time_fn(lambda: torch.ops.fastdiffinst._roi_align_backward(*args), device, repeats)
    t_base = time_fn(lambda: torch.ops.torchvision._roi_align_backward(*args), device, repeats)
    progress.update(2)
    rows.append(_row("roi_align", f"C={CHANNELS} 200x304 K={k}", "backward", t_ours, t_base,
                     _traffic(rois) / (bandwidth * 1e9), bandwidth, rois, float("nan"), repeats))

    # Multi-level.
    batch = 2
    features = [torch.randn(batch, CHANNELS, math.ceil(IMAGE_H * s), math.ceil(IMAGE_W * s), generator=generator)
                .to(device) for s in SCALES]
    boxes = [detection_boxes(500, generator) for _ in range(batch)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)]).to(device)
    grad = torch.randn(rois.shape[0], CHANNELS, OUTPUT, OUTPUT, generator=generator).to(device)
    histogram = torch.bincount(assign_fpn_levels(rois[:, 1:].cpu(), 2, 5), minlength=4).tolist()
    progress.write(f"multilevel_roi_align level histogram P2..P5: {histogram}")
    multi = {
        "ours": lambda f, r: multilevel_roi_align(f, r, OUTPUT, SCALES, SAMPLING, True),
        "torchvision": torchvision_pooler,
    }
    out = _compare("multilevel_roi_align", f"B=2x500 C={CHANNELS} P2-P5 of 800x1216", multi, features, rois, grad,
                   device, repeats, bandwidth, progress)
    for row in out:
        row["level_histogram"] = histogram
    return rows + out


def _compare(op, case, variants, features, rois, grad, device, repeats, bandwidth, progress) -> list[dict]:
    ours, baseline = variants["ours"], variants["torchvision"]
    with torch.no_grad():
        err = (ours(features, rois) - baseline(features, rois)).abs().max().item()
    rows = []
    for direction in ("forward", "forward+backward"):
        if direction == "forward":
            def make(fn):
                def call():
                    with torch.no_grad():
                        fn(features, rois)
                return call
            inputs = features
        else:
            inputs = [f.detach().clone().requires_grad_() for f in features]

            def make(fn):
                return lambda: _fwd_bwd(fn, inputs, rois, grad)
        t_ours = time_fn(make(ours), device, repeats)
        progress.update(1)
        t_base = time_fn(make(baseline), device, repeats)
        progress.update(1)
        floor_s = _traffic(rois) / (bandwidth * 1e9) * (1 if direction == "forward" else 2)
        rows.append(_row(op, case, direction, t_ours, t_base, floor_s, bandwidth, rois, err, repeats))
        del inputs
    return rows


def _traffic(rois) -> int:
    return rois.shape[0] * OUTPUT * OUTPUT * SAMPLING**2 * 4 * CHANNELS * 4


def _row(op, case, direction, t_ours, t_base, floor_s, bandwidth, rois, err, repeats) -> dict:
    return {
        "study": "roi_align", "op": op, "case": case, "direction": direction, "baseline": "torchvision",
        "ours_ms": fmt_ms(t_ours.median_s), "ours_range_ms": f"{fmt_ms(t_ours.min_s)}-{fmt_ms(t_ours.max_s)}",
        "baseline_ms": fmt_ms(t_base.median_s), "baseline_range_ms": f"{fmt_ms(t_base.min_s)}-{fmt_ms(t_base.max_s)}",
        "speedup": f"{t_base.median_s / t_ours.median_s:.2f}x", "tap_traffic_GB": f"{_traffic(rois) / 1e9:.2f}",
        "copy_GBps": f"{bandwidth:.1f}", "x_traffic_floor": f"{t_ours.median_s / floor_s:.2f}",
        "max_abs_diff": "" if err != err else f"{err:.2e}", "repeats": repeats,
    }


STEPS = 10  # timed measurements, for the progress bar
