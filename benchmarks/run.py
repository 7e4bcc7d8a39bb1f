"""Throughput studies of fastdiffinst: our fused ops vs their baselines, side by side in one run.

    python benchmarks/run.py                      # quick profile on CPU, all studies
    python benchmarks/run.py --profile full --device cuda --studies roi_align --out results/

Prints a table, and writes results.json and results.md to ``--out`` (default
``benchmarks/results/<stamp>/``), stamped with device, versions and commit.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import box_diffusion_study, harness, mask_head_study, roi_align_study  # noqa: E402

STUDIES = {"mask_head": mask_head_study, "roi_align": roi_align_study, "box_diffusion": box_diffusion_study}
COLUMNS = [("op", "op"), ("case", "case"), ("direction", "direction"), ("baseline", "baseline"),
           ("ours_ms", "ours ms (median)"), ("ours_range_ms", "ours min-max"), ("baseline_ms", "baseline ms"),
           ("baseline_range_ms", "baseline min-max"), ("speedup", "speed-up"), ("ours_rate", "ours throughput"),
           ("x_traffic_floor", "× traffic floor"), ("max_abs_diff", "max abs diff / notes")]


class _Progress:
    """tqdm when installed, else a plain counter."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="benchmarks", unit="run", file=sys.stderr)
        except ImportError:
            self._bar, self._done, self._total = None, 0, total

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)
        else:
            self._done += n
            print(f"[{self._done}/{self._total}]", file=sys.stderr)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["quick", "full"], default="quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, from {sorted(STUDIES)}")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<stamp>)")
    args = parser.parse_args(argv)

    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        parser.error(f"unknown studies {unknown}; choose from {sorted(STUDIES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA device is available")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)

    meta = harness.stamp(args.device)
    meta["profile"] = args.profile
    print(f"fastdiffinst benchmarks · {meta['device']} · torch {meta['torch']} · triton {meta['triton']} · "
          f"commit {meta['commit']} · profile {args.profile}")
    progress = _Progress(sum(STUDIES[s].STEPS for s in studies))
    results = []
    for name in studies:
        results += STUDIES[name].run(args.device, args.profile, progress)
    progress.close()

    table = harness.markdown_table(results, COLUMNS)
    print(table)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or ROOT / "benchmarks" / "results" / f"{stamp}-{args.device.replace(':', '')}"
    harness.write_results(out_dir, meta, results, table)
    print(f"results written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
