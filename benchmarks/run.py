"""Throughput studies of fastdiffinst: our fused ops and the model on them vs their baselines, side
by side in one run (docs/design.md §7).

    python benchmarks/run.py                      # quick profile (~3 minutes on 2 CPU cores), all studies
    python -m benchmarks.run --profile full --device cuda --studies model,roi_align --out results/

The studies are the modules of the ``benchmarks`` package; run as a file, this script runs itself
again as that package's module (``python -m benchmarks.run``, the repository root importable).

Studies: mask_head, roi_align, box_diffusion, paste_masks (each op vs its official formulation and,
where they exist, our batched reference and torch.compile of it), model (DiffusionInst inference,
fused ops vs the official formulations, and where its time goes), model_training (a training
step: time and peak memory) and model_precision (the model in fp32 and bf16, eager and compiled, at
batch 1 and 8, against the official formulations in fp32 and under bf16 autocast, interleaved). The
machine's ceilings (copy bandwidth, fp32/bf16 matmul rates, and on GPU the FP32 FMA rate) are
measured first, and every op's achieved rate is given against them.

Prints a table and the targets, and writes results.json, results.md and PNG plots to ``--out``
(default ``benchmarks/results/<stamp>-<device>/``), stamped with device, versions and commit.
``--profile smoke`` runs every study's code on tiny sizes with one repeat: a check of the code
path (the tests use it), not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

if not __package__:  # `python benchmarks/run.py`: run again as the package's module, same arguments
    _root = str(Path(__file__).resolve().parents[1])
    _env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")])))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *sys.argv[1:]], _env)

import torch

from benchmarks import (
    box_diffusion_study,
    harness,
    mask_head_study,
    model_study,
    paste_masks_study,
    plots,
    precision_study,
    roi_align_study,
)
from fastdiffinst.progress import ProgressBar

RESULTS = Path(__file__).resolve().parent / "results"  # the default parent of --out


class Study(NamedTuple):
    run: Callable[..., list[dict]]       # (device, profile, progress, ceilings) -> rows
    steps: Callable[[str], int]          # profile -> timed measurements, for the progress bar


STUDIES = {name: Study(module.run, module.steps) for name, module in (
    ("mask_head", mask_head_study), ("roi_align", roi_align_study), ("box_diffusion", box_diffusion_study),
    ("paste_masks", paste_masks_study))}
STUDIES["model"] = Study(model_study.run_inference, model_study.inference_steps)
STUDIES["model_training"] = Study(model_study.run_training, model_study.training_steps)
STUDIES["model_precision"] = Study(precision_study.run, precision_study.steps)
PROFILES = ("quick", "full", "smoke")
COLUMNS = [("op", "op"), ("case", "case"), ("direction", "direction"), ("baseline", "baseline"),
           ("ours_ms", "ours ms (median)"), ("ours_range_ms", "ours min-max"), ("baseline_ms", "baseline ms"),
           ("baseline_range_ms", "baseline min-max"), ("speedup", "speed-up"), ("ours_rate", "ours throughput"),
           ("x_traffic_floor", "× traffic floor"), ("max_abs_diff", "max abs diff / notes")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, from {sorted(STUDIES)}")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides (default 2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results/<stamp>-<device>)")
    args = parser.parse_args(argv)
    args.studies = list(dict.fromkeys(s.strip() for s in args.studies.split(",") if s.strip()))  # once each
    unknown = [s for s in args.studies if s not in STUDIES]
    if unknown or not args.studies:
        parser.error(f"unknown studies {unknown}; choose from {sorted(STUDIES)}" if unknown
                     else f"--studies is empty; choose from {sorted(STUDIES)}")
    device_type = args.device.split(":")[0]
    if device_type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device} was asked for but no CUDA device is available "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
        index = torch.device(args.device).index
        if index is not None and index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or RESULTS / f"{stamp}-{args.device.replace(':', '')}"
    from fastdiffinst.checkpoint import ensure_writable

    try:  # before hours of measurements, not after
        ensure_writable(args.out)
    except OSError as error:
        parser.error(f"--out: {error}")
    return args


def targets_summary(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if "target" in row:
            value = row["speedup"] if "speedup_x" in row else f"{row['memory_ratio']:.2f} of baseline"
            verdict = "met" if row["target_met"] else "NOT met"
            lines.append(f"- {row['case']}, {row['direction']}: {value} (target {row['target']}): {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and torch.device(args.device).index is not None:
        torch.cuda.set_device(torch.device(args.device))
    meta = harness.stamp(args.device)
    meta.update(profile=args.profile, studies=args.studies)
    print(f"fastdiffinst benchmarks · {meta['device']} · torch {meta['torch']} · triton {meta['triton']} · "
          f"commit {meta['commit']} · profile {args.profile}")
    meta["ceilings"] = harness.ceilings(args.device, small=args.profile == "smoke")
    print("measured ceilings: " + ", ".join(f"{k} {v:.3g}" for k, v in meta["ceilings"].items()))
    progress = ProgressBar(sum(STUDIES[s].steps(args.profile) for s in args.studies), "benchmarks", "run",
                           count_without_tqdm=True)
    results = []
    for name in args.studies:
        results += STUDIES[name].run(args.device, args.profile, progress, meta["ceilings"])
        # Written after every study, so that a run cut short (gpu_check's stage timeouts) keeps
        # what it measured; "complete" says whether every requested study finished.
        meta["complete"] = name == args.studies[-1]
        harness.write_results(args.out, meta, results, harness.markdown_table(results, COLUMNS),
                              targets_summary(results))
    progress.close()

    table = harness.markdown_table(results, COLUMNS)
    targets = targets_summary(results)
    print(table)
    if targets:
        print("\ntargets:\n" + targets)
    figures, skipped = plots.write_plots(args.out, results)
    if skipped:
        print(skipped)
    harness.write_results(args.out, meta, results, table, targets, [f.name for f in figures])
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
