"""pytest-benchmark microbenchmarks of the ops, for regression tracking (not part of ``make test``):

    pytest benchmarks/ --benchmark-only                                  # run and print the table
    pytest benchmarks/ --benchmark-only --benchmark-autosave             # save a baseline (.benchmarks/)
    pytest benchmarks/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Each op on one mid-size shape (CPU: 2 threads, fp32; CUDA when available with
``FASTDIFFINST_BENCH_DEVICE=cuda``), our kernel and its baseline in the same group, so the table
shows both side by side. The inputs are built once per test, outside the timed function.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from benchmarks.roi_align_study import SCALES, detection_boxes, torchvision_pooler
from fastdiffinst import ops
from fastdiffinst.common.boxes import box_cxcywh_to_xyxy
from fastdiffinst.common.diffusion import DiffusionSchedule, cosine_schedule
from fastdiffinst.reference import box_diffusion as bd
from fastdiffinst.reference import dynamic_mask_head as ref_head

DEVICE = os.environ.get("FASTDIFFINST_BENCH_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    raise pytest.UsageError("FASTDIFFINST_BENCH_DEVICE=cuda but no CUDA device is available")
IMAGE = (400, 608)  # levels of a half-size COCO image
torch.set_num_threads(int(os.environ.get("FASTDIFFINST_BENCH_THREADS", "2")))


def _sync(fn):
    if not DEVICE.startswith("cuda"):
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


@pytest.fixture(scope="module")
def pyramid():
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(1, 256, math.ceil(IMAGE[0] * s), math.ceil(IMAGE[1] * s), generator=g).to(DEVICE)
                for s in SCALES]
    rois = torch.cat([torch.zeros(200, 1), detection_boxes(200, g, IMAGE)], dim=1).to(DEVICE)
    return features, rois


@pytest.mark.parametrize("impl", ["fused", "torchvision"])
def test_roi_align_forward(benchmark, pyramid, impl):
    import torchvision

    features, rois = pyramid
    fn = ops.roi_align if impl == "fused" else torchvision.ops.roi_align
    benchmark.group = "roi_align forward C=256 P2 K=200"
    with torch.no_grad():
        out = benchmark(_sync(lambda: fn(features[0], rois, 7, 0.25, 2, True)))
    assert out.shape == (200, 256, 7, 7)


@pytest.mark.parametrize("impl", ["fused", "torchvision per level"])
def test_multilevel_roi_align_forward_backward(benchmark, pyramid, impl):
    features, rois = pyramid
    inputs = [f.clone().requires_grad_() for f in features]

    def fn():
        for f in inputs:
            f.grad = None
        pooled = (ops.multilevel_roi_align(inputs, rois, 7, SCALES, 2, True) if impl == "fused"
                  else torchvision_pooler(inputs, rois))
        pooled.sum().backward()
    benchmark.group = "multilevel_roi_align forward+backward C=256 P2-P5 K=200"
    benchmark(_sync(fn))
    assert all(f.grad is not None for f in inputs)


@pytest.fixture(scope="module")
def mask_inputs():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 8, 100, 152, generator=g).to(DEVICE)
    params = (torch.randn(100, 153, generator=g) * 0.3).to(DEVICE)
    return feats, params, torch.zeros(100, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("impl", ["fused", "official grouped conv"])
def test_dynamic_mask_head_forward(benchmark, mask_inputs, impl):
    feats, params, index = mask_inputs
    fn = ops.dynamic_mask_head if impl == "fused" else ref_head.dynamic_mask_head
    benchmark.group = "dynamic_mask_head forward N=100 100x152"
    out = benchmark(_sync(lambda: fn(feats, params, index)))
    assert out.shape == (100, 100, 152)


@pytest.mark.parametrize("impl", ["fused", "official grouped conv"])
def test_dynamic_mask_head_forward_backward(benchmark, mask_inputs, impl):
    feats, params, index = (t.clone() for t in mask_inputs)
    feats.requires_grad_()
    params.requires_grad_()
    fn = ops.dynamic_mask_head if impl == "fused" else ref_head.dynamic_mask_head

    def step():
        feats.grad = params.grad = None
        fn(feats, params, index).sum().backward()
    benchmark.group = "dynamic_mask_head forward+backward N=100 100x152"
    benchmark(_sync(step))
    assert params.grad is not None


@pytest.mark.parametrize("impl", ["fused", "official per-image"])
def test_ddim_step_boxes(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    batch, num = 4, 500
    schedule = cosine_schedule()
    whwh = torch.tensor([[608.0, 400.0, 608.0, 400.0]] * batch)
    x_t = torch.randn(batch, num, 4, generator=g)
    pred = box_cxcywh_to_xyxy(torch.rand(batch, num, 4, generator=g) * 0.6 + 0.2) * whwh[:, None]
    keep = torch.rand(batch, num, generator=g) < 0.5
    noise, renew = ops.draw_ddim_noise(batch, num, g)
    tensors = [t.to(DEVICE) for t in (x_t, pred, whwh, keep, noise, renew)]
    x_t, pred, whwh, keep, noise, renew = tensors
    sched = DiffusionSchedule(**{k: getattr(schedule, k).to(DEVICE) for k in DiffusionSchedule.__dataclass_fields__})
    step = ops.ddim_step_boxes if impl == "fused" else bd.official_ddim_step_batch

    def fn():
        return step(x_t, whwh, pred_boxes=pred, keep=keep, t=999, t_next=749, schedule=sched, noise=noise,
                    renew_noise=renew, eta=1.0, scale=2.0)
    benchmark.group = "ddim_step_boxes B=4 N=500"
    assert benchmark(_sync(fn)) is not None


@pytest.mark.parametrize("impl", ["fused", "official chain"])
def test_paste_masks(benchmark, impl):
    from fastdiffinst.reference import masks as ref_masks

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 100, 152, generator=g).to(DEVICE)
    boxes = detection_boxes(50, g, IMAGE).clamp(min=0)
    boxes = torch.minimum(boxes, torch.tensor([IMAGE[1], IMAGE[0]] * 2)).to(DEVICE)
    fn = ops.paste_masks if impl == "fused" else ref_masks.paste_masks
    benchmark.group = "paste_masks N=50 400x608 (no resize)"
    out = benchmark(_sync(lambda: fn(probs, boxes, IMAGE, IMAGE)))
    assert out.shape == (50, *IMAGE)
