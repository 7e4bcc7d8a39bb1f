"""Model study: the whole DiffusionInst on the fused ops vs the same random weights on the official
formulations (``ops_impl="fused"`` vs ``"reference"``: per-level torchvision RoIAlign, per-image
float64 DDIM math, grouped-convolution mask head), same images and same random draws (docs/design.md §7).

* **Inference** (``model(images)``, eval mode, output at the input size). Quick: ``r50_coco``, one
  512² image, N ∈ {100, 500} proposals, 1 DDIM step, eager, 3 repeats after 2 warm-ups. Full adds
  N = 300, 4 steps, ``compile=True`` (compile time excluded, reported apart), 800×1216 and batch 2.
* **Where the time goes** (the N = 500 case): image preparation + backbone + FPN + mask branch,
  DDIM sampling (decoder + box ops), and post-processing (top-k, NMS, masks, paste), each timed
  alone.
* **Training step** on 2×320² (forward + backward, random GT): step time (quick: the median of 2
  steps after the first, which is the memory measurement and the warm-up) and peak memory of the
  defaults (fused: with recomputation; reference: as the official code, without), and, for
  honesty about where the memory goes, each side with the other's recomputation setting; and ours
  in bf16 (mixed precision) where the device computes bf16 natively. Every variant runs in a fresh
  process (``benchmarks.training_memory.measure``).

Targets (floors, for the quick and full profiles): inference at N = 500 ≥ 1.5× on CPU,
≥ 2× on GPU; training peak memory ≤ ½ of the reference on CPU, ≤ ⅓ on GPU; the bf16 training step
≥ 2× faster than the reference in fp32 with ≤ ½ its peak memory. Rows carry ``target`` and
``target_met``.
The smoke profile (tests) runs the same code on the ``tiny`` preset at 64² with 1 repeat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from benchmarks.harness import Timing, comparison_row, in_fresh_process, memory_row, time_fn

STUDY, TRAINING_STUDY, OP = "model", "model_training", "DiffusionInst"
BASELINE = "reference ops (official)"


@dataclass(frozen=True)
class InferenceCase:
    size: tuple[int, int]
    batch: int
    proposals: int
    steps: int
    compile: bool = False

    def label(self, preset: str) -> str:
        mode = "compiled" if self.compile else "eager"
        return (f"{preset} {self.batch}x{self.size[0]}x{self.size[1]} N={self.proposals} "
                f"{self.steps} step{'s' if self.steps > 1 else ''} {mode}")


@dataclass(frozen=True)
class Profile:
    preset: str
    inference: tuple[InferenceCase, ...]
    breakdown: InferenceCase
    train_size: int
    train_batch: int
    train_proposals: int
    repeats: int
    warmup: int
    train_repeats: int
    train_warmup: int


def _grid(size, batch, proposals, steps, compile=False):
    return tuple(InferenceCase(size, batch, n, s, compile) for s in steps for n in proposals)


PROFILES = {
    "smoke": Profile("tiny", _grid((64, 64), 1, (10, 20), (1,)) + _grid((64, 64), 1, (10,), (2,)),
                     InferenceCase((64, 64), 1, 20, 1),
                     64, 2, 20, 1, 0, 1, 0),
    "quick": Profile("r50_coco", _grid((512, 512), 1, (100, 500), (1,)), InferenceCase((512, 512), 1, 500, 1),
                     320, 2, 500, 3, 2, 2, 0),
    "full": Profile("r50_coco",
                    _grid((512, 512), 1, (100, 300, 500), (1, 4)) + _grid((512, 512), 1, (500,), (1,), True)
                    + _grid((800, 1216), 2, (500,), (1,)) + _grid((800, 1216), 2, (500,), (1,), True),
                    InferenceCase((512, 512), 1, 500, 1), 320, 2, 500, 5, 2, 5, 1),
}
# (inference target at N = 500, training memory target) per device type.
TARGETS = {"cpu": (1.5, 1 / 2), "cuda": (2.0, 1 / 3)}


def inference_steps(profile: str) -> int:
    return 2 * len(PROFILES[profile].inference) + 6


def training_steps(profile: str) -> int:
    return 5


def _images(case: InferenceCase) -> list[torch.Tensor]:
    """The same random images for every case of one size and batch (seeded)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, *case.size), generator=generator, dtype=torch.uint8) for _ in range(case.batch)]


def _models(preset: str, case: InferenceCase, device: str, state: dict | None, compile: bool | None = None):
    """The fused and the reference model with the same (seeded random) weights, configured for
    ``case`` (proposals, DDIM steps, compilation unless ``compile`` says otherwise)."""
    from fastdiffinst.config import get_config, replace_path
    from fastdiffinst.modeling import DiffusionInst

    cfg = replace_path(get_config(preset), "num_proposals", case.proposals)
    cfg = replace_path(cfg, "sampler.sample_steps", case.steps)
    models = {}
    for impl in ("fused", "reference"):
        torch.manual_seed(0)
        model = DiffusionInst(cfg, ops_impl=impl, compile=case.compile if compile is None else compile)
        if state is not None:
            model.load_state_dict(state)
        models[impl] = model.to(device).eval()
    return models


def _agreement(ours: list[dict], base: list[dict]) -> str:
    counts = "/".join(f"{len(o['scores'])}:{len(b['scores'])}" for o, b in zip(ours, base))
    note = f"instances fused:reference {counts}"
    if all(len(o["scores"]) == len(b["scores"]) for o, b in zip(ours, base)):
        diff = max(((o["scores"] - b["scores"]).abs().max().item() for o, b in zip(ours, base) if len(o["scores"])),
                   default=0.0)
        note += f"; max |score diff| {diff:.1e}"
    return note


def run_inference(device: str, profile: str, progress, ceilings: dict) -> list[dict]:
    """The inference cases, then where the time goes."""
    p = PROFILES[profile]
    speed_target = TARGETS["cuda" if device.startswith("cuda") else "cpu"][0]
    rows, state = [], None
    for case in p.inference:
        models = _models(p.preset, case, device, state)
        state = models["fused"].state_dict()
        images = [im.to(device) for im in _images(case)]

        def infer(model, images=images):
            return model(images, generator=torch.Generator(device="cpu").manual_seed(1))

        compile_s = {}
        if case.compile:  # the first call compiles; excluded from the timings, reported apart
            for impl, model in models.items():
                start = time.perf_counter()
                infer(model)
                compile_s[impl] = time.perf_counter() - start
        timings = {}
        for impl, model in models.items():
            timings[impl] = time_fn(lambda model=model: infer(model), device, p.repeats, p.warmup)
            progress.update(1)
        note = _agreement(infer(models["fused"]), infer(models["reference"]))
        if compile_s:
            note += f"; first call (compile) fused {compile_s['fused']:.0f} s, reference {compile_s['reference']:.0f} s"
        row = comparison_row(STUDY, OP, case.label(p.preset), "inference", BASELINE, timings["fused"],
                             timings["reference"], n=case.proposals, steps=models["fused"].cfg.sampler.sample_steps,
                             batch=case.batch, size=list(case.size), compile=case.compile, max_abs_diff=note)
        if case == p.breakdown and profile != "smoke":
            row.update(target=f">= {speed_target}x", target_met=row["speedup_x"] >= speed_target)
        rows.append(row)
        del models
    return rows + _breakdown(p, device, state, progress)


def run_training(device: str, profile: str, progress, ceilings: dict) -> list[dict]:
    """The training step: time and peak memory."""
    memory_target = TARGETS["cuda" if device.startswith("cuda") else "cpu"][1]
    return _training(PROFILES[profile], device, memory_target if profile != "smoke" else None, progress)


def _breakdown(p: Profile, device: str, state: dict | None, progress) -> list[dict]:
    """The inference case ``p.breakdown`` in three parts, each timed alone on both sides."""
    case = p.breakdown
    models = _models(p.preset, case, device, state, compile=False)
    images = [im.to(device) for im in _images(case)]
    inputs = {}
    for impl, model in models.items():  # each part's inputs, made before timing
        with torch.no_grad():
            batch = model.preprocess(images)
            features = model.extract_features(batch.tensor)
            sampled = model.sample(features, batch.images_whwh, generator=torch.Generator().manual_seed(1))
        inputs[impl] = (batch, features, sampled)

    def features_part(impl):
        model = models[impl]
        return lambda: model.extract_features(model.preprocess(images).tensor)

    def sampling_part(impl):
        model, (batch, features, _) = models[impl], inputs[impl]
        return lambda: model.sample(features, batch.images_whwh, generator=torch.Generator().manual_seed(1))

    def postprocess_part(impl):
        model, (batch, features, sampled) = models[impl], inputs[impl]
        return lambda: model.instances(sampled, features, batch.image_sizes, batch.image_sizes)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    rows = []
    for part, make in (("images + backbone + FPN + mask branch", features_part),
                       ("DDIM sampling (decoder + box ops)", sampling_part),
                       ("post-processing (top-k, NMS, masks, paste)", postprocess_part)):
        timings = {}
        for impl in models:
            timings[impl] = time_fn(no_grad(make(impl)), device, p.repeats, p.warmup)
            progress.update(1)
        rows.append(comparison_row(STUDY, OP, case.label(p.preset), f"inference: {part}", BASELINE, timings["fused"],
                                   timings["reference"], n=case.proposals,
                                   steps=models["fused"].cfg.sampler.sample_steps, batch=case.batch,
                                   size=list(case.size), compile=False))
    return rows


def _training(p: Profile, device: str, memory_target: float | None, progress) -> list[dict]:
    """Training-step time and peak memory, every variant in a fresh process."""
    case = f"{p.preset} {p.train_batch}x{p.train_size}x{p.train_size} N={p.train_proposals} training step"
    runs = {}
    for impl, recompute, repeats in (("fused", True, p.train_repeats), ("reference", False, p.train_repeats),
                                     ("fused", False, 0), ("reference", True, 0)):
        runs[impl, recompute] = in_fresh_process("benchmarks.training_memory:measure", impl, recompute, p.preset,
                                                 p.train_size, p.train_batch, p.train_proposals, device, repeats,
                                                 p.train_warmup)
        progress.update(1)
    fused, reference = runs["fused", True], runs["reference", False]
    timing = {k: Timing(**v["step"]) for k, v in (("fused", fused), ("reference", reference))}
    loss_note = f"loss fused {fused['loss']:.4f}, reference {reference['loss']:.4f}"
    rows = [comparison_row(TRAINING_STUDY, OP, case, "training step (forward + backward)", BASELINE, timing["fused"],
                           timing["reference"], n=p.train_proposals, max_abs_diff=loss_note)]
    memory = memory_row(TRAINING_STUDY, OP, case, BASELINE, fused["peak_bytes"], reference["peak_bytes"],
                        n=p.train_proposals,
                        max_abs_diff="defaults: fused recomputes, the reference stores (as the official code)")
    if memory_target is not None:
        memory.update(target=f"<= {memory_target:.2f}", target_met=memory["memory_ratio"] <= memory_target)
    rows.append(memory)
    rows.append(memory_row(TRAINING_STUDY, OP, case + ", both without recomputation", "reference ops (official)",
                           runs["fused", False]["peak_bytes"], reference["peak_bytes"], n=p.train_proposals,
                           max_abs_diff="what the fused kernels alone save"))
    rows.append(memory_row(TRAINING_STUDY, OP, case + ", both with recomputation", "reference ops + recomputation",
                           fused["peak_bytes"], runs["reference", True]["peak_bytes"], n=p.train_proposals,
                           max_abs_diff="what the fused kernels save on top of recomputation"))
    return rows + _bf16_training(p, device, case, reference, progress)


def _bf16_training(p: Profile, device: str, case: str, reference: dict, progress) -> list[dict]:
    """Our default training step in bf16 (mixed precision) against the official formulations in fp32:
    time and peak memory; only where the device computes bf16 natively (the smoke profile runs it
    anyway, as a check of the code path)."""
    from fastdiffinst.modeling.precision import emulation_reason

    reason = emulation_reason("bf16", device)
    progress.update(1)
    if reason is not None and p is not PROFILES["smoke"]:
        print(f"{TRAINING_STUDY}: {case} in bf16 not timed: {reason}")
        return []
    half = in_fresh_process("benchmarks.training_memory:measure", "fused", True, p.preset, p.train_size,
                            p.train_batch, p.train_proposals, device, p.train_repeats, p.train_warmup, "bf16")
    note = f"loss bf16 {half['loss']:.4f}, reference fp32 {reference['loss']:.4f}"
    rows = [comparison_row(TRAINING_STUDY, OP, case, "training step (forward + backward), bf16", BASELINE,
                           Timing(**half["step"]), Timing(**reference["step"]), n=p.train_proposals, max_abs_diff=note),
            memory_row(TRAINING_STUDY, OP, case + ", bf16", BASELINE, half["peak_bytes"], reference["peak_bytes"],
                       n=p.train_proposals, max_abs_diff="ours bf16 (recomputation) vs the official fp32")]
    if p is not PROFILES["smoke"]:
        rows[0].update(target=">= 2.0x", target_met=rows[0]["speedup_x"] >= 2.0)
        rows[1].update(target="<= 0.50", target_met=rows[1]["memory_ratio"] <= 0.5)
    return rows
