"""Validation AP against training time for one or more training runs, in one PNG.

    python benchmarks/ap_curve.py --out curve.png RUN_A:LABEL_A RUN_B:LABEL_B [--metric AP50]

Each RUN is a training run's folder (its ``metrics.jsonl``: the evaluation records and the training
seconds logged with each iteration record, evaluations and checkpoints not counted); a run's
curve is its segm and bbox ``--metric`` at each evaluation, against the training minutes at that
iteration (interpolated between logged iterations). A ``final.json`` in the run folder
(``fastdiffinst eval --out``'s ``metrics.json``) adds the full-validation-set point at the end,
drawn hollow. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def curve(run: Path, metric: str) -> tuple[list[tuple[float, float, float]], tuple[float, float, float] | None]:
    """``([(minutes, segm, bbox) per evaluation], the final full evaluation or None)``."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = sorted((r["iter"], r["train_s"]) for r in records if "train_s" in r)
    # An evaluation between two logged iterations: the training time interpolated between them.
    points = [(float(np.interp(r["iter"], *zip(*logged))) / 60, r["eval"]["segm"][metric], r["eval"]["bbox"][metric])
              for r in records if "eval" in r and logged and r["iter"] <= logged[-1][0]]
    final = None
    if (run / "final.json").is_file() and points:
        metrics = json.loads((run / "final.json").read_text())["metrics"]
        final = (points[-1][0], metrics["segm"][metric], metrics["bbox"][metric])
    return points, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RUN_FOLDER:LABEL")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metric", default="AP50", choices=["AP", "AP50", "AP75"])
    parser.add_argument("--target", type=float, help="a horizontal line at this AP (percent)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, spec in enumerate(args.runs):
        folder, _, label = spec.partition(":")
        points, final = curve(Path(folder), args.metric)
        color = f"C{i}"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=label)
        ax.plot([p[0] for p in points], [p[2] for p in points], marker=".", linestyle="--", color=color)
        if final is not None:
            ax.scatter([final[0]] * 2, final[1:], facecolors="none", edgecolors=color, s=80)
    # One entry per run (its colour), and one per style: what the line and marker kinds mean.
    key = [plt.Line2D([], [], color="grey", marker="o", label="segm (first 50 validation images)"),
           plt.Line2D([], [], color="grey", marker=".", linestyle="--", label="bbox (first 50 validation images)"),
           plt.Line2D([], [], color="grey", marker="o", markerfacecolor="none", markersize=9, linestyle="none",
                      label="segm and bbox, all 200 validation images")]
    if args.target is not None:
        ax.axhline(args.target, color="grey", linewidth=0.8)
    ax.set_xlabel("training wall-clock (minutes; evaluations and checkpoints not counted)")
    ax.set_ylabel(f"validation {args.metric} (percent)")
    ax.grid(alpha=0.3)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + key, fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
