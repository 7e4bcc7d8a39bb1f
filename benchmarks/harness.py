"""Timing, stamping and reporting shared by the throughput studies (DESIGN §7).

Protocol: inputs (random draws included) are built before timing and passed to both sides;
2 warm-ups, then >= 5 timed repeats; median and min-max reported, ratios of medians. CPU timings
use ``time.perf_counter`` with a fixed thread count; CUDA timings use CUDA events.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


@dataclasses.dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak RSS of this process image (VmHWM). ``ru_maxrss`` would do, but Linux carries it over
    from the parent through fork/exec, so a child started by a big benchmark process reports the
    parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, repeats: int = 5, warmup: int = 2) -> Timing:
    """Median/min/max wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def copy_bandwidth(device: str, mbytes: int = 256) -> float:
    """Measured copy bandwidth in GB/s (bytes read + written) on ``device`` for a large buffer."""
    n = mbytes * (1 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeats=5)
    return 2 * n * 4 / t.median_s / 1e9


def git_commit() -> str:
    """The checkout's commit (FASTDIFFINST_COMMIT when the tree travels without .git)."""
    if os.environ.get("FASTDIFFINST_COMMIT"):
        return os.environ["FASTDIFFINST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads of {os.cpu_count()} CPUs)"


def stamp(device: str) -> dict:
    """Who, what and where of a benchmark run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except ImportError:
        torchvision_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "torchvision": torchvision_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
    }


def fmt_ms(seconds: float) -> str:
    """Milliseconds with 3 significant digits or more (0.0201, 1.23, 123.45)."""
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.4f}"


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` = [(key, header), ...]."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, meta: dict, results: list[dict], table: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    header = (f"# fastdiffinst benchmarks\n\n{meta['date']} · {meta['device']} · torch {meta['torch']} · "
              f"triton {meta['triton']} · torchvision {meta['torchvision']} · commit {meta['commit']}\n\n")
    (out_dir / "results.md").write_text(header + table + "\n")
