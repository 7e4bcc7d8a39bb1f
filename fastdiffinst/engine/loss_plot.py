"""``loss.png``: the training losses and the validation AP of a run, from its ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path

from fastdiffinst.engine.metrics_log import MetricsLog


def plot_losses(metrics_file: Path, png: Path) -> bool:
    """The total and per-term (last stage) losses against the iteration, and the segm AP of each
    evaluation; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = MetricsLog(metrics_file).records()
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    its = [r["iter"] for r in train]
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_masks"):
        left.plot(its, [r[key] for r in train], label=key, linewidth=1.5 if key == "loss" else 1)
    left.set_xlabel("iteration")
    left.set_ylabel("loss (weighted)")
    left.set_yscale("log")
    left.legend()
    if evals:
        for key in ("AP", "AP50"):
            right.plot([r["iter"] for r in evals], [r["eval"]["segm"][key] for r in evals], marker="o",
                       label=f"segm {key}")
            right.plot([r["iter"] for r in evals], [r["eval"]["bbox"][key] for r in evals], marker="x", linestyle="--",
                       label=f"bbox {key}")
        right.legend()
    right.set_xlabel("iteration")
    right.set_ylabel("validation AP (%)")
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return True
