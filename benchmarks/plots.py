"""PNG plots of a benchmark run: speed-up against the number of proposals/instances, and peak
memory side by side. Needs matplotlib (an optional extra); without it, no plots and a message."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def write_plots(out_dir: Path, rows: list[dict]) -> tuple[list[Path], str | None]:
    """-> (written files, a message when plots were skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: plots skipped (pip install -r requirements-extra.txt)"
    written = []
    speed = _speedup_series(rows)
    if speed:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in sorted(speed.items()):
            points.sort()
            ax.plot([n for n, _ in points], [s for _, s in points], marker="o", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("proposals / instances N")
        ax.set_ylabel("speed-up over the official formulation (×)")
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
        ax.set_title("fused vs official, medians")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        written.append(_save(fig, out_dir / "speedup_vs_n.png"))
    memory = [r for r in rows if "ours_peak_bytes" in r]
    if memory:
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(memory) + 1.5))
        labels = [f"{r['op']}: {r['case']}\nvs {r['baseline']}" for r in memory]
        y = range(len(memory))
        ax.barh([i + 0.2 for i in y], [r["baseline_peak_bytes"] / 2**20 for r in memory], 0.4, label="baseline")
        ax.barh([i - 0.2 for i in y], [r["ours_peak_bytes"] / 2**20 for r in memory], 0.4, label="fused")
        ax.set_yticks(list(y), labels, fontsize=6)
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
        ax.set_xlabel("peak memory (MiB, log scale)")
        ax.legend(fontsize=7)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        written.append(_save(fig, out_dir / "memory.png"))
    return written, None


def _speedup_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Speed-up vs N lines: the model's inference (one line per configuration) and the dynamic mask
    head against the official grouped convolutions (one line per direction)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if "n" not in r or "speedup_x" not in r:
            continue
        if r["study"] == "model" and r["direction"] == "inference":
            size = "x".join(map(str, r["size"]))
            label = (f"model {r['batch']}x{size}, {r['steps']} step{'s' if r['steps'] > 1 else ''}"
                     f"{', compiled' if r['compile'] else ''}")
        elif r["study"] == "mask_head" and r["baseline"] == "official grouped conv":
            label = f"dynamic_mask_head {r['direction']}"
        else:
            continue
        series[label].append((r["n"], r["speedup_x"]))
    return series


def _plain_ticks(axis) -> None:
    """Log-scale ticks as plain numbers (1, 10, 100) instead of 10^k, no minor labels."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
