"""RoIAlign study: our kernels vs torchvision, single-level and multi-level, forward and
forward+backward (fp32, inputs NCHW as the model produces them; conversions counted).

* single-level: C = 256, a 200x304 map (P2 of 800x1216), K = 1000 boxes, 7x7, sampling 2, aligned;
  baseline ``torchvision.ops.roi_align``.
* multi-level: B = 2, 500 boxes per image with sqrt(area) log-uniform in [16, 800] px and aspect
  log-uniform in [1/3, 3] (seed 0), C = 256, P2-P5 of 800x1216; baseline the per-level loop of
  detectron2's ROIPooler over ``torchvision.ops.roi_align`` (level rule, nonzero, index_put).

The smoke profile (tests) runs the same code on C = 16, a 64x96 image and 20 boxes.

Traffic model: every bilinear tap read as one C-vector of fp32 = K * PH*PW * grid^2 * 4 * C * 4 bytes;
its floor is that traffic at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from benchmarks.harness import comparison_row, rate_note, time_fn
from fastdiffinst.common.levels import assign_fpn_levels
from fastdiffinst.ops import multilevel_roi_align, roi_align

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
OUTPUT, SAMPLING = 7, 2


@dataclass(frozen=True)
class Sizes:
    image: tuple[int, int]       # (H, W) of the image the levels come from
    channels: int
    single_boxes: int
    boxes_per_image: int         # multi-level, B = 2
    repeats: int
    warmup: int = 2


PROFILES = {"smoke": Sizes((64, 96), 16, 20, 10, 1, 0), "quick": Sizes((800, 1216), 256, 1000, 500, 5),
            "full": Sizes((800, 1216), 256, 1000, 500, 10)}


def detection_boxes(n: int, generator: torch.Generator, image: tuple[int, int] = (800, 1216)) -> torch.Tensor:
    """``n`` xyxy boxes in an ``image`` (H, W): sqrt(area) log-uniform in [16, 800] px (at most the
    image's longer side), aspect log-uniform in [1/3, 3]."""
    height, width = image
    top = min(800.0, float(max(image)))
    size = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(16), math.log(top), generator=generator))
    aspect = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1 / 3), math.log(3), generator=generator))
    w, h = size * aspect.sqrt(), size / aspect.sqrt()
    cx = torch.rand(n, dtype=torch.float64, generator=generator) * width
    cy = torch.rand(n, dtype=torch.float64, generator=generator) * height
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


def run(device: str, profile: str, progress, ceilings: dict) -> list[dict]:
    import torchvision

    sizes = PROFILES[profile]
    generator = torch.Generator().manual_seed(0)
    height, width = sizes.image
    channels, k = sizes.channels, sizes.single_boxes
    rows = []

    # Single level (P2).
    feats = torch.randn(1, channels, height // 4, width // 4, generator=generator).to(device)
    rois = torch.cat([torch.zeros(k, 1), detection_boxes(k, generator, sizes.image)], dim=1).to(device)
    grad = torch.randn(k, channels, OUTPUT, OUTPUT, generator=generator).to(device)
    single = {
        "ours": lambda f, r: roi_align(f[0], r, OUTPUT, 0.25, SAMPLING, True),
        "torchvision": lambda f, r: torchvision.ops.roi_align(f[0], r, OUTPUT, 0.25, SAMPLING, True),
    }
    case = f"C={channels} {height // 4}x{width // 4} K={k}"
    rows += _compare("roi_align", case, single, [feats], rois, grad, device, sizes, ceilings, progress)
    # Backward alone: the two registered backward ops on the same gradient.
    args = (grad, rois, 0.25, OUTPUT, OUTPUT, 1, channels, feats.shape[2], feats.shape[3], SAMPLING, True)
    t_ours = time_fn(lambda: torch.ops.fastdiffinst._roi_align_backward(*args), device, sizes.repeats, sizes.warmup)
    t_base = time_fn(lambda: torch.ops.torchvision._roi_align_backward(*args), device, sizes.repeats, sizes.warmup)
    progress.update(2)
    rows.append(_row("roi_align", case, "backward", t_ours, t_base, rois, channels, ceilings, float("nan")))

    # Multi-level (P2-P5).
    batch = 2
    features = [torch.randn(batch, channels, math.ceil(height * s), math.ceil(width * s), generator=generator)
                .to(device) for s in SCALES]
    boxes = [detection_boxes(sizes.boxes_per_image, generator, sizes.image) for _ in range(batch)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)]).to(device)
    grad = torch.randn(rois.shape[0], channels, OUTPUT, OUTPUT, generator=generator).to(device)
    histogram = torch.bincount(assign_fpn_levels(rois[:, 1:].cpu(), 2, 5), minlength=4).tolist()
    progress.write(f"multilevel_roi_align level histogram P2..P5: {histogram}")
    multi = {
        "ours": lambda f, r: multilevel_roi_align(f, r, OUTPUT, SCALES, SAMPLING, True),
        "torchvision": torchvision_pooler,
    }
    case = f"B=2x{sizes.boxes_per_image} C={channels} P2-P5 of {height}x{width}"
    out = _compare("multilevel_roi_align", case, multi, features, rois, grad, device, sizes, ceilings, progress)
    for row in out:
        row["level_histogram"] = histogram
    return rows + out


def _compare(op, case, variants, features, rois, grad, device, sizes, ceilings, progress) -> list[dict]:
    ours, baseline = variants["ours"], variants["torchvision"]
    with torch.no_grad():
        err = (ours(features, rois) - baseline(features, rois)).abs().max().item()
    channels = features[0].shape[1]
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

            def make(fn, inputs=inputs):
                return lambda: _fwd_bwd(fn, inputs, rois, grad)
        t_ours = time_fn(make(ours), device, sizes.repeats, sizes.warmup)
        progress.update(1)
        t_base = time_fn(make(baseline), device, sizes.repeats, sizes.warmup)
        progress.update(1)
        rows.append(_row(op, case, direction, t_ours, t_base, rois, channels, ceilings, err))
        del inputs
    return rows


def _traffic(rois, channels: int) -> int:
    return rois.shape[0] * OUTPUT * OUTPUT * SAMPLING**2 * 4 * channels * 4


def _row(op, case, direction, t_ours, t_base, rois, channels, ceilings, err) -> dict:
    # The backward re-reads the taps' weights and writes every tap once: about the forward's traffic.
    traffic = _traffic(rois, channels) * (2 if direction == "forward+backward" else 1)
    achieved = traffic / t_ours.median_s / 1e9
    bandwidth = ceilings["copy_GBps"]
    return comparison_row(
        "roi_align", op, case, direction, "torchvision", t_ours, t_base,
        ours_rate=rate_note(achieved, "GB/s", bandwidth, "copy"), achieved_GBps=achieved,
        tap_traffic_GB=f"{traffic / 1e9:.3f}", x_traffic_floor=f"{t_ours.median_s / (traffic / (bandwidth * 1e9)):.2f}",
        max_abs_diff="" if err != err else f"{err:.2e}")


def steps(profile: str) -> int:
    """Timed measurements, for the progress bar."""
    return 10
