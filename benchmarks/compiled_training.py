"""Compiled training against eager, as ``train --compile`` runs it, and recomputation against
stored activations: the same training batches (a preset's augmentation on a data set's training
split, so the image sizes vary), up to four variants, each in a fresh process, the processes
interleaved over rounds (A B C, B C A, ...):

- ``eager``: batches padded to their largest image, ``train``'s default recomputation (off on the CPU);
- ``eager square``: batches padded to ``input.square_pad`` (what ``--compile`` sets), eager;
- ``compiled square``: ``--compile``: backbone + FPN, mask branch and decoder compiled;
- ``eager recompute``: ``--recompute``: the backbone and decoder recomputed in the backward.

    python benchmarks/compiled_training.py --out benchmarks/results/STAMP-compiled-training-cpu
    python benchmarks/compiled_training.py --variants eager "eager recompute" --out ...

The inductor cache starts empty (a temporary folder), so the first compiled process's first
iteration is a cold compilation and the later ones read the cache, as a user's second run would.
Writes ``results.json`` (every process's per-iteration seconds) and ``results.md`` (steady-state
medians of the per-round medians, min–max over rounds, ratios to eager, compile times).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: the repository root importable, for the benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness

VARIANTS = ("eager", "eager square", "compiled square", "eager recompute")
# Iterations left out of the steady state: the first compiles, the next ones warm the allocator.
SETTLE = 3


def measure(variant: str, preset: str, data: str, iterations: int, overrides: list[str]) -> dict:
    """Seconds of each of ``iterations`` training iterations of ``variant`` (a fresh Trainer)."""
    from fastdiffinst.config import get_config, override
    from fastdiffinst.engine.train import Trainer, TrainOptions

    cfg = override(get_config(preset), overrides)
    if variant == "eager square":
        cfg = override(cfg, [f"input.square_pad={cfg.input.max_size_train}"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, TrainOptions(out=Path(out) / "run", data=data, compile=variant == "compiled square",
                                            recompute=True if variant == "eager recompute" else None,
                                            progress=False))
        loader = trainer._loader()
        seconds = []
        for _ in range(iterations):
            batch = next(loader)
            start = time.perf_counter()
            trainer._train_iteration(batch)
            seconds.append(time.perf_counter() - start)
    return {"variant": variant, "seconds": seconds, "square_pad": trainer.cfg.input.square_pad,
            "recompute": trainer.module.backbone.bottom_up.recompute}


def summarise(runs: list[dict], variants: list[str]) -> dict[str, harness.Timing]:
    """Per variant: the median over rounds of each process's steady-state median iteration."""
    timings = {}
    for variant in variants:
        medians = [statistics.median(r["seconds"][SETTLE:]) for r in runs if r["variant"] == variant]
        timings[variant] = harness.Timing(statistics.median(medians), min(medians), max(medians), len(medians))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--iterations", type=int, default=25, help=f"per process (the first {SETTLE} not timed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="the variants to time (eager, the baseline of the ratios, always runs)")
    parser.add_argument("overrides", nargs="*", help="key=value configuration fields")
    args = parser.parse_args()
    if args.iterations <= SETTLE:
        parser.error(f"--iterations must exceed {SETTLE}")
    variants = ["eager"] + [v for v in VARIANTS[1:] if v in args.variants]
    torch.set_num_threads(args.threads)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # cold at the first compile
    runs = []
    for round_ in range(args.rounds):
        shift = round_ % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            run = harness.in_fresh_process("benchmarks.compiled_training:measure", variant, args.preset, args.data,
                                           args.iterations, args.overrides)
            runs.append({**run, "round": round_})
            print(f"round {round_} {variant}: first {run['seconds'][0]:.1f} s, steady median "
                  f"{statistics.median(run['seconds'][SETTLE:]):.3f} s", flush=True)
    timings = summarise(runs, variants)
    compiled_first = [r["seconds"][0] for r in runs if r["variant"] == "compiled square"]
    case = f"{args.preset} on {args.data}, batch of the preset, {' '.join(args.overrides) or 'no overrides'}"
    square_pad = {r["variant"]: r["square_pad"] for r in runs}
    rows = [harness.comparison_row("compiled_training", "training iteration", case, variant, "eager",
                                   timings[variant], timings["eager"], square_pad=square_pad[variant])
            for variant in variants[1:]]
    if compiled_first:
        rows.append({"study": "compiled_training", "op": "first iteration (compilation)", "case": case,
                     "direction": "compiled square", "ours_ms": " / ".join(f"{s * 1e3:.0f}" for s in compiled_first),
                     "baseline": "cold cache, then warm"})
    table = harness.markdown_table(rows, [("op", "what"), ("direction", "variant"), ("ours_ms", "ms"),
                                          ("ours_range_ms", "min-max over rounds"), ("baseline_ms", "eager ms"),
                                          ("speedup", "eager / variant")])
    meta = {**harness.stamp("cpu"), "profile": f"{args.rounds} rounds x {args.iterations} iterations",
            "runs": runs}
    harness.write_results(args.out, meta, rows, table)
    print(table)


if __name__ == "__main__":
    main()
