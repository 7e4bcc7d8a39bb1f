"""Dynamic-mask-head study: the fused op vs the official grouped-convolution formulation, the bmm
formulation and ``torch.compile`` of it, on the same inputs (DESIGN §7).

One 800×1216 image: mask features [1, 8, 200, 304] (stride 4), DiffusionInst filters [N, 153],
N in {50, 100, 500} (quick profile: {50, 100}), fp32. Forward (logits) and forward+backward (a
random upstream gradient). Throughput in GFLOP/s with DESIGN §2.1's count (272·N·H·W forward,
twice that for the backward) against the machine's measured ceiling: on CPU a large fp32 matmul,
on GPU a Triton FMA loop (non-tensor-core FP32 peak).

Peak memory of a training-style pass (logits -> sigmoid -> dice against stride-4 targets ->
backward; the official code tiles the features per instance): on CPU each variant runs in a
fresh subprocess and reports its peak RSS (VmHWM, the ru_maxrss of that process image) minus the
RSS once its inputs are built; on GPU
``torch.cuda.max_memory_allocated`` above the inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.harness import fmt_ms, peak_rss_bytes, rss_bytes, time_fn
from fastdiffinst.ops import dynamic_mask_dice_sums, dynamic_mask_head
from fastdiffinst.reference import dynamic_mask_head as ref

HEIGHT, WIDTH, CHANNELS = 200, 304, 8


def _inputs(n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, CHANNELS, HEIGHT, WIDTH, generator=g)
    params = torch.randn(n, 153, generator=g) * 0.3
    grad = torch.randn(n, HEIGHT, WIDTH, generator=g)
    gt = (torch.rand(max(n // 5, 1), HEIGHT, WIDTH, generator=g) > 0.7).to(torch.uint8)
    gt_index = torch.randint(0, gt.shape[0], (n,), generator=g)
    return [t.to(device) for t in (feats, params, torch.zeros(n, dtype=torch.int64), grad, gt, gt_index)]


def _flops(n: int) -> float:
    return 272.0 * n * HEIGHT * WIDTH


def measured_peak_gflops(device: str) -> tuple[float, str]:
    """The machine's attainable fp32 rate: GFLOP/s of a 2048³ matmul on CPU; of a Triton FMA loop
    (CUDA cores, no tensor cores) on GPU."""
    if device.startswith("cuda"):
        from benchmarks.fma_peak import fma_peak_gflops

        return fma_peak_gflops(), "Triton FP32 FMA loop"
    a = torch.randn(2048, 2048)
    timing = time_fn(lambda: a @ a, device, repeats=5)
    return 2 * 2048**3 / timing.median_s / 1e9, "fp32 2048³ matmul"


def _variants(feats, params, image_index):
    return {
        "fused": lambda f, p: dynamic_mask_head(f, p, image_index),
        "official grouped conv": lambda f, p: ref.dynamic_mask_head(f, p, image_index),
        "bmm": lambda f, p: ref.dynamic_mask_head_bmm(f, p, image_index),
    }


def run(device: str, profile: str, progress) -> list[dict]:
    sizes = (50, 100) if profile == "quick" else (50, 100, 500)
    repeats = 3 if profile == "quick" else 5
    peak, peak_what = measured_peak_gflops(device)
    rows = []
    for n in sizes:
        feats, params, image_index, grad, _, _ = _inputs(n, device)
        variants = _variants(feats, params, image_index)
        fused = variants.pop("fused")
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled_fn = torch.compile(ref.dynamic_mask_head_bmm, dynamic=False)
        compiled_fn(feats, params, image_index)
        compile_fwd_s = time.perf_counter() - start
        variants["torch.compile(bmm)"] = lambda f, p: compiled_fn(f, p, image_index)
        fused_out = fused(feats, params)
        err = (fused_out - ref.dynamic_mask_head(feats, params, image_index)).abs().max().item()
        for direction in ("forward", "forward+backward"):
            if direction == "forward":
                def timed(fn):
                    return lambda: fn(feats, params)
            else:
                f, p = feats.clone().requires_grad_(), params.clone().requires_grad_()

                def timed(fn, f=f, p=p):
                    def step():
                        f.grad = p.grad = None
                        fn(f, p).backward(grad)
                    return step
            t_fused = time_fn(timed(fused), device, repeats)
            progress.update(1)
            flops = _flops(n) * (3 if direction != "forward" else 1)
            rate = flops / t_fused.median_s / 1e9
            rate_note = f"{rate:.0f} GFLOP/s = {100 * rate / peak:.0f}% of {peak:.0f} ({peak_what})"
            if device.startswith("cuda") and direction == "forward":
                # Back-to-back launches keep the GPU busy, so the host overhead of the op (checks,
                # dispatch, ~0.15 ms) drops out: the kernel's own rate.
                from triton.testing import do_bench

                kernel_ms = do_bench(timed(fused))
                kernel_rate = flops / kernel_ms / 1e6
                rate_note += (f"; back-to-back {kernel_ms:.3f} ms = {kernel_rate:.0f} GFLOP/s = "
                              f"{100 * kernel_rate / peak:.0f}%")
            for name, fn in variants.items():
                note = f"max abs diff {err:.1e}" if name == "official grouped conv" else ""
                if name.startswith("torch.compile"):
                    note = f"compile {compile_fwd_s:.1f} s (forward)"
                t_base = time_fn(timed(fn), device, repeats)
                progress.update(1)
                rows.append({
                    "study": "mask_head", "op": "dynamic_mask_head", "case": f"N={n} 200x304 fp32",
                    "direction": direction, "baseline": name,
                    "ours_ms": fmt_ms(t_fused.median_s),
                    "ours_range_ms": f"{fmt_ms(t_fused.min_s)}-{fmt_ms(t_fused.max_s)}",
                    "baseline_ms": fmt_ms(t_base.median_s),
                    "baseline_range_ms": f"{fmt_ms(t_base.min_s)}-{fmt_ms(t_base.max_s)}",
                    "speedup": f"{t_base.median_s / t_fused.median_s:.2f}x",
                    "ours_rate": rate_note,
                    "x_traffic_floor": "", "max_abs_diff": note, "repeats": repeats,
                })
    rows += memory_rows(device, 100 if profile == "quick" else 500)
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
    ref.dice_loss_from_sums(sums).sum().backward()


def _measure_in_this_process(variant: str, n: int, device: str) -> dict:
    feats, params, image_index, _, gt, gt_index = _inputs(n, device)
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


def memory_rows(device: str, n: int) -> list[dict]:
    results = {}
    for variant in ("fused", "official grouped conv", "bmm"):
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            results[variant] = _measure_in_this_process(variant, n, device)["peak_bytes"]
        else:
            code = ("import json, sys; from benchmarks.mask_head_study import _measure_in_this_process as m; "
                    f"print(json.dumps(m({variant!r}, {n}, 'cpu')))")
            env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if out.returncode != 0:
                raise RuntimeError(f"memory measurement of {variant} failed:\n{out.stderr[-2000:]}")
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    rows = []
    for name in ("official grouped conv", "bmm"):
        rows.append({
            "study": "mask_head", "op": "dynamic_mask_dice_sums", "case": f"N={n} 200x304 fp32 training pass",
            "direction": "peak memory", "baseline": name,
            "ours_ms": f"{results['fused'] / 2**20:.1f} MiB", "ours_range_ms": "",
            "baseline_ms": f"{results[name] / 2**20:.1f} MiB", "baseline_range_ms": "",
            "speedup": f"{results[name] / max(results['fused'], 1):.1f}x less", "ours_rate": "",
            "x_traffic_floor": "", "max_abs_diff": "logits->sigmoid->dice->backward", "repeats": 1,
        })
    return rows


STEPS = 3 * 2 * 4 + 1  # (sizes in the full profile) x directions x variants, + memory
