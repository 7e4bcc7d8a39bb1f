"""Precision study: the model as a user runs it, in fp32 and bf16, against the official formulations in
fp32 and under bf16 autocast (the official code with its AMP switch on), same seeded random weights,
same images and random boxes (docs/precision.md).

Each row also gives the work the call cannot avoid: the floating-point operations of its matrix
products and convolutions, counted once per case by ``torch.utils.flop_counter`` on ``ours fp32``
(``dense_gflop``; the fused ops and element-wise passes are not counted), the rate achieved over them
against the matrix-product ceiling of the variant's precision measured in the same run
(``ours_rate``), and ``ceiling_bound_x``: the speed-up over the baseline that a call would reach if
every one of those operations ran at that ceiling and nothing else took time — the most any
implementation of these layers can give on the machine.

Variants of each case: ``official fp32`` (the baseline of every row), ``official bf16 autocast``,
``ours fp32``, ``ours bf16`` (half-precision copies of the dense modules), and in the full profile
``ours fp32 compiled`` and ``ours bf16 compiled`` (the DDIM step as one graph; compile time reported
apart); on a GPU ``ours bf16 CUDA graph`` (the step compiled with ``mode="reduce-overhead"``, batch
1, every profile). The variants of a case are timed **interleaved**: each repeat runs every variant once, the
order rotated from one repeat to the next, so that a slow spell of the machine lands on every side
(:func:`benchmarks.harness.time_interleaved`); medians with min-max, ratios of medians.

Cases: ``r50_coco``, 512², 500 proposals, 1 step, batch 1 and batch 8 (images/s); the full profile
adds 4 steps. Half-precision variants run only on devices that compute them natively
(:func:`fastdiffinst.modeling.precision.emulation_reason`): elsewhere they would time ATen's fallback
kernels, tens of times slower, and the study says so instead. The smoke profile runs every variant
on the ``tiny`` preset at 64², batch 1 and 2, eager (emulated or not: a check of the code path).

Targets (floors, CPU): ours bf16 ≥ 3× official fp32 and ≥ 1.5× official bf16 autocast at batch 1;
compiled bf16 ≥ 4×; batch 8 images/s ≥ 3× official fp32; 4 steps ≥ 3.5×. GPU: ours bf16 ≥ 3×.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from benchmarks.harness import comparison_row, rate_note, time_interleaved

STUDY, OP = "model_precision", "DiffusionInst"
BASELINE = "official fp32"


@dataclass(frozen=True)
class Variant:
    ops_impl: str
    precision: str
    autocast: bool = False
    compile: bool | str = False

    @property
    def half(self) -> bool:
        """Whether its matrix products run in bf16 (our copies or the official code's autocast)."""
        return self.autocast or self.precision != "fp32"


VARIANTS = {
    "official fp32": Variant("reference", "fp32"),
    "official bf16 autocast": Variant("reference", "fp32", autocast=True),
    "ours fp32": Variant("fused", "fp32"),
    "ours bf16": Variant("fused", "bf16"),
    "ours fp32 compiled": Variant("fused", "fp32", compile=True),
    "ours bf16 compiled": Variant("fused", "bf16", compile=True),
    "ours bf16 CUDA graph": Variant("fused", "bf16", compile="reduce-overhead"),
}


@dataclass(frozen=True)
class Case:
    size: int
    batch: int
    proposals: int
    steps: int
    variants: tuple[str, ...]

    def __post_init__(self) -> None:
        if "ours fp32" not in self.variants:  # the case's FLOPs are counted on it
            raise ValueError(f"a precision study case must time 'ours fp32', got {self.variants}")

    def label(self, preset: str) -> str:
        return f"{preset} {self.batch}x{self.size}x{self.size} N={self.proposals} {self.steps} step" + \
            ("s" if self.steps > 1 else "")


_EAGER = ("official fp32", "official bf16 autocast", "ours fp32", "ours bf16")


@dataclass(frozen=True)
class Profile:
    preset: str
    cases: tuple[Case, ...]
    repeats: int
    warmup: int


PROFILES = {
    # Compilation is left out of the smoke profile (minutes on 2 cores; tests/test_model.py checks it).
    "smoke": Profile("tiny", (Case(64, 1, 10, 1, _EAGER), Case(64, 2, 10, 1, _EAGER)), 1, 0),
    "quick": Profile("r50_coco", (Case(512, 1, 500, 1, _EAGER + ("ours bf16 CUDA graph",)),
                                  Case(512, 8, 500, 1, _EAGER)), 3, 1),
    "full": Profile("r50_coco", (Case(512, 1, 500, 1, tuple(VARIANTS)), Case(512, 8, 500, 1, _EAGER),
                                 Case(512, 1, 500, 4, _EAGER)), 5, 1),
}
# (variant, versus, batch, steps) -> floor of the speed-up, per device type.
TARGETS = {
    "cpu": {("ours bf16", BASELINE, 1, 1): 3.0, ("ours bf16", "official bf16 autocast", 1, 1): 1.5,
            ("ours bf16 compiled", BASELINE, 1, 1): 4.0, ("ours bf16", BASELINE, 8, 1): 3.0,
            ("ours bf16", BASELINE, 1, 4): 3.5},
    "cuda": {("ours bf16", BASELINE, 1, 1): 3.0, ("ours bf16 CUDA graph", BASELINE, 1, 1): 3.0},
}


def steps(profile: str) -> int:
    return sum(len(case.variants) for case in PROFILES[profile].cases)


def _runnable(variant: Variant, device: str, profile: str) -> str | None:
    """Why ``variant`` is not timed on ``device`` (None when it is)."""
    from fastdiffinst.modeling.precision import emulation_reason

    if variant.compile == "reduce-overhead" and not device.startswith("cuda"):
        return "CUDA graphs need a CUDA device"
    return None if profile == "smoke" or not variant.half else emulation_reason("bf16", device)


def dense_flops(call) -> int:
    """The floating-point operations of the matrix products and convolutions ``call()`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def _ceiling_tflops(variant: Variant, ceilings: dict) -> tuple[float, str]:
    """The matrix-product ceiling (TFLOP/s) of the precision ``variant`` multiplies in, and its name."""
    return (ceilings["bf16_matmul_TFLOPs"], "bf16 matmul") if variant.half else \
        (ceilings["fp32_matmul_TFLOPs"], "fp32 matmul")


def _model(preset: str, case: Case, variant: Variant, device: str):
    from fastdiffinst.config import get_config, replace_path
    from fastdiffinst.modeling import DiffusionInst

    cfg = replace_path(get_config(preset), "num_proposals", case.proposals)
    cfg = replace_path(cfg, "sampler.sample_steps", case.steps)
    torch.manual_seed(0)  # the same random weights for every variant
    model = DiffusionInst(cfg, ops_impl=variant.ops_impl, compile=variant.compile, precision=variant.precision)
    return model.to(device).eval()


def run(device: str, profile: str, progress, ceilings: dict) -> list[dict]:
    p = PROFILES[profile]
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    rows = []
    for case in p.cases:
        generator = torch.Generator().manual_seed(0)
        images = [torch.randint(0, 256, (3, case.size, case.size), generator=generator, dtype=torch.uint8).to(device)
                  for _ in range(case.batch)]
        calls, notes = {}, {}
        for name in case.variants:
            variant = VARIANTS[name]
            reason = _runnable(variant, device, profile)
            progress.update(1)
            if reason is not None:
                print(f"{STUDY}: {case.label(p.preset)}, {name} not timed: {reason}")
                continue
            model = _model(p.preset, case, variant, device)

            def call(model=model, variant=variant, images=images):
                autocast = torch.autocast(device_type, dtype=torch.bfloat16) if variant.autocast else \
                    contextlib.nullcontext()
                with autocast:
                    return model(images, generator=torch.Generator().manual_seed(1))

            if variant.compile:  # the first call compiles: excluded from the timings, reported apart
                start = time.perf_counter()
                try:
                    call()
                except Exception as error:  # one variant's compiler failure must not cost the others
                    print(f"{STUDY}: {case.label(p.preset)}, {name} not timed: its compilation failed: "
                          f"{type(error).__name__}: {str(error)[:300]}")
                    continue
                notes[name] = f"first call (compile) {time.perf_counter() - start:.0f} s"
            calls[name] = call
        # The model's layers, the same in every variant (the official formulations add a few
        # counted products in their reference ops: r50_coco 512², 1 step: 194.1 against 193.5 GFLOP).
        gflop = dense_flops(calls["ours fp32"]) / 1e9
        timings = time_interleaved(calls, device, p.repeats, p.warmup)
        for name, timing in timings.items():
            if name == BASELINE:
                continue
            versus = [BASELINE] + (["official bf16 autocast"] if name.startswith("ours bf16")
                                   and "official bf16 autocast" in timings else [])
            ceiling, ceiling_name = _ceiling_tflops(VARIANTS[name], ceilings)
            for other in versus:
                bound = timings[other].median_s * ceiling * 1e3 / gflop
                row = comparison_row(STUDY, OP, case.label(p.preset), name, other, timing, timings[other],
                                     batch=case.batch, steps=case.steps, n=case.proposals, size=[case.size] * 2,
                                     images_per_s=case.batch / timing.median_s,
                                     baseline_images_per_s=case.batch / timings[other].median_s,
                                     max_abs_diff="; ".join(filter(None, [
                                         f"{case.batch / timing.median_s:.2f} vs "
                                         f"{case.batch / timings[other].median_s:.2f} images/s",
                                         f"{gflop:.0f} GFLOP of products: {bound:.2f}x at the {ceiling_name} ceiling",
                                         notes.get(name)])),
                                     dense_gflop=gflop, ceiling_bound_x=bound,
                                     ours_rate=rate_note(gflop / timing.median_s, "GFLOP/s", 1e3 * ceiling,
                                                         ceiling_name))
                target = TARGETS[device_type].get((name, other, case.batch, case.steps))
                if target is not None and profile != "smoke":
                    row.update(target=f">= {target}x", target_met=row["speedup_x"] >= target)
                rows.append(row)
        del calls  # the models, before the next case's
    return rows
