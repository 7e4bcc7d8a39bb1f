"""Dynamic-mask-head study: the fused op vs the official grouped-convolution formulation, the bmm
formulation and ``torch.compile`` of it, on the same inputs (docs/design.md §7).

One 800×1216 image: mask features [1, 8, 200, 304] (stride 4), DiffusionInst filters [N, 153],
N in {50, 100, 500} (quick profile: {50, 100}; smoke, for tests: N = 3 on 16×24), fp32. Forward
(logits) and forward+backward (a random upstream gradient). Throughput in GFLOP/s with the count
of docs/design.md §2.1 (272·N·H·W forward, twice that for the backward) against the machine's
ceiling measured in the same run: on CPU the fp32 matmul rate, on GPU the FP32 FMA rate of the CUDA cores
(the 8-channel layers cannot use tensor cores: ``tl.dot`` needs K ≥ 16).

Peak memory of a training-style pass (logits -> sigmoid -> dice against stride-4 targets ->
backward; the official code tiles the features per instance): on CPU each variant runs in a
fresh subprocess and reports its peak RSS (VmHWM) minus the RSS once its inputs are built; on GPU
``torch.cuda.max_memory_allocated`` above the inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from benchmarks.harness import (
    comparison_row,
    in_fresh_process,
    memory_row,
    peak_rss_bytes,
    rate_note,
    rss_bytes,
    time_fn,
)
from fastdiffinst.ops import dice_loss_from_sums, dynamic_mask_dice_sums, dynamic_mask_head
from fastdiffinst.reference import dynamic_mask_head as ref

CHANNELS = 8


@dataclass(frozen=True)
class Sizes:
    map: tuple[int, int]          # (H, W) of the stride-4 mask features
    instances: tuple[int, ...]
    memory_instances: int
    repeats: int
    warmup: int = 2


PROFILES = {"smoke": Sizes((16, 24), (3,), 3, 1, 0), "quick": Sizes((200, 304), (50, 100), 100, 3),
            "full": Sizes((200, 304), (50, 100, 500), 500, 5)}


def _inputs(n: int, size: tuple[int, int], device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, CHANNELS, *size, generator=g)
    params = torch.randn(n, 153, generator=g) * 0.3
    grad = torch.randn(n, *size, generator=g)
    gt = (torch.rand(max(n // 5, 1), *size, generator=g) > 0.7).to(torch.uint8)
    gt_index = torch.randint(0, gt.shape[0], (n,), generator=g)
    return [t.to(device) for t in (feats, params, torch.zeros(n, dtype=torch.int64), grad, gt, gt_index)]


def _with_index(fn, image_index):
    """``fn(f, p, image_index)`` as a function of the features and the filters."""
    return lambda f, p: fn(f, p, image_index)


def _variants(image_index):
    return {
        "fused": _with_index(dynamic_mask_head, image_index),
        "official grouped conv": _with_index(ref.dynamic_mask_head, image_index),
        "bmm": _with_index(ref.dynamic_mask_head_bmm, image_index),
    }


def run(device: str, profile: str, progress, ceilings: dict) -> list[dict]:
    sizes = PROFILES[profile]
    height, width = sizes.map
    cuda = device.startswith("cuda")
    # GFLOP/s, against the rate the op's arithmetic can reach on this machine.
    peak = 1e3 * (ceilings["fp32_fma_TFLOPs"] if cuda else ceilings["fp32_matmul_TFLOPs"])
    peak_what = "the FP32 FMA rate" if cuda else "the fp32 matmul rate"
    rows = []
    for n in sizes.instances:
        feats, params, image_index, grad, _, _ = _inputs(n, sizes.map, device)
        variants = _variants(image_index)
        fused = variants.pop("fused")
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled_fn = torch.compile(ref.dynamic_mask_head_bmm, dynamic=False)
        compiled_fn(feats, params, image_index)
        compile_fwd_s = time.perf_counter() - start
        variants["torch.compile(bmm)"] = _with_index(compiled_fn, image_index)
        err = (fused(feats, params) - ref.dynamic_mask_head(feats, params, image_index)).abs().max().item()
        for direction in ("forward", "forward+backward"):
            if direction == "forward":
                def timed(fn, f=feats, p=params):
                    return lambda: fn(f, p)
            else:
                f, p = feats.clone().requires_grad_(), params.clone().requires_grad_()

                def timed(fn, f=f, p=p, grad=grad):
                    def step():
                        f.grad = p.grad = None
                        fn(f, p).backward(grad)
                    return step
            t_fused = time_fn(timed(fused), device, sizes.repeats, sizes.warmup)
            progress.update(1)
            flops = 272.0 * n * height * width * (3 if direction != "forward" else 1)
            rate = flops / t_fused.median_s / 1e9
            note = rate_note(rate, "GFLOP/s", peak, peak_what)
            if cuda and direction == "forward":
                # Back-to-back launches keep the GPU busy, so the host overhead of the op (checks,
                # dispatch, ~0.15 ms) drops out: the kernel's own rate.
                from triton.testing import do_bench

                kernel_ms = do_bench(timed(fused))
                note += f"; back-to-back {kernel_ms:.3f} ms = {100 * flops / kernel_ms / 1e6 / peak:.0f}%"
            for name, fn in variants.items():
                diff = f"max abs diff {err:.1e}" if name == "official grouped conv" else ""
                if name.startswith("torch.compile"):
                    diff = f"compile {compile_fwd_s:.1f} s (forward)"
                t_base = time_fn(timed(fn), device, sizes.repeats, sizes.warmup)
                progress.update(1)
                rows.append(comparison_row("mask_head", "dynamic_mask_head", f"N={n} {height}x{width} fp32", direction,
                                           name, t_fused, t_base, n=n, ours_rate=note, achieved_GFLOPs=rate,
                                           max_abs_diff=diff))
    rows += memory_rows(device, sizes.memory_instances, sizes.map)
    progress.update(1)
    return rows


# ---------------------------------------------------------------------------------------------
# Peak memory of a training-style pass

def _training_pass(variant: str, feats, params, image_index, gt, gt_index) -> None:
    """logits -> sigmoid -> dice against the stride-4 targets -> backward."""
    f, p = feats.requires_grad_(), params.requires_grad_()
    if variant == "fused":
        sums = dynamic_mask_dice_sums(f, p, image_index, gt, gt_index)
    else:
        head = ref.dynamic_mask_head if variant == "official grouped conv" else ref.dynamic_mask_head_bmm
        sums = ref.dice_sums(head(f, p, image_index).sigmoid(), gt, gt_index)
    dice_loss_from_sums(sums).sum().backward()


def training_pass_peak(variant: str, n: int, size: list[int], device: str) -> dict:
    """Peak bytes of one training-style pass above its inputs, measured in this process."""
    feats, params, image_index, _, gt, gt_index = _inputs(n, tuple(size), device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _training_pass(variant, feats, params, image_index, gt, gt_index)
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base}
    base = rss_bytes()
    _training_pass(variant, feats, params, image_index, gt, gt_index)
    return {"peak_bytes": peak_rss_bytes() - base}


def memory_rows(device: str, n: int, size: tuple[int, int]) -> list[dict]:
    peaks = {}
    for variant in ("fused", "official grouped conv", "bmm"):
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            peaks[variant] = training_pass_peak(variant, n, list(size), device)["peak_bytes"]
        else:
            peaks[variant] = in_fresh_process("benchmarks.mask_head_study:training_pass_peak", variant, n,
                                              list(size), "cpu")["peak_bytes"]
    return [memory_row("mask_head", "dynamic_mask_dice_sums", f"N={n} {size[0]}x{size[1]} fp32 training pass", name,
                       peaks["fused"], peaks[name], n=n, max_abs_diff="logits->sigmoid->dice->backward")
            for name in ("official grouped conv", "bmm")]


def steps(profile: str) -> int:
    """Timed measurements, for the progress bar: sizes x directions x variants, + memory."""
    return len(PROFILES[profile].instances) * 2 * 4 + 1
