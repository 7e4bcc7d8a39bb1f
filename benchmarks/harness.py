"""Timing, stamping and reporting shared by the throughput studies (docs/design.md §7).

Protocol: inputs (random draws included) are built before timing and passed to both sides;
2 warm-ups, then timed repeats (5 by default; the quick profile's slow cases use 3 — the model's
inference and the mask head — and the training step 2 after its cold first step; every row
records its ``repeats``); median and min-max reported, ratios of medians. CPU
timings use ``time.perf_counter`` with a fixed thread count; CUDA timings use CUDA events.
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
import sys
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


def synchronize(device: str) -> None:
    """Waits for the GPU's queued work on a CUDA device; nothing on CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, repeats: int = 5, warmup: int = 2) -> Timing:
    """Median/min/max wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
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


def matmul_tflops(device: str, dtype: torch.dtype, size: int) -> float:
    """Measured TFLOP/s of a ``size``³ matrix product in ``dtype`` (tensor cores on GPU for bf16;
    fp32 matmuls run without TF32, torch's default)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    t = time_fn(lambda: a @ b, device, repeats=5)
    return 2 * size**3 / t.median_s / 1e12


def ceilings(device: str, small: bool = False) -> dict:
    """The machine's measured limits, in this run: copy bandwidth (GB/s), fp32 and bf16 matmul
    rates (TFLOP/s) and, on GPU, the FP32 FMA rate of the CUDA cores (what the dynamic mask head's
    8-channel layers can use; ``tl.dot`` needs K >= 16). ``small`` uses small buffers (tests)."""
    cuda = device.startswith("cuda")
    size = 256 if small else (8192 if cuda else 2048)
    out = {
        "copy_GBps": copy_bandwidth(device, 8 if small else (1024 if cuda else 256)),
        "fp32_matmul_TFLOPs": matmul_tflops(device, torch.float32, size),
        # bf16 has no fast path on most CPUs: a smaller product keeps the measurement short.
        "bf16_matmul_TFLOPs": matmul_tflops(device, torch.bfloat16, size if cuda else size // 2),
    }
    if cuda:
        from benchmarks.fma_peak import fma_peak_gflops

        out["fp32_fma_TFLOPs"] = fma_peak_gflops() / 1e3
    return out


def rate_note(achieved: float, unit: str, ceiling: float, what: str) -> str:
    """``"123 GB/s = 45% of copy (273 GB/s)"``; ``achieved``/``ceiling`` in ``unit``."""
    return f"{achieved:.3g} {unit} = {100 * achieved / ceiling:.0f}% of {what} ({ceiling:.3g} {unit})"


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


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, repeats: int = 5,
                     warmup: int = 1) -> dict[str, Timing]:
    """Median/min/max wall time of each of ``fns``, measured interleaved: ``warmup`` rounds, then
    ``repeats`` rounds that each run every function once, the order rotated by one each round
    (A B C, B C A, C A B, ...), so that a slow spell of the machine lands on every side and a
    ratio of medians cannot be flipped by a neighbour."""
    names = list(fns)
    if not names:
        return {}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_fn(fns[name], device, repeats=1, warmup=0).median_s)
    return {name: Timing(statistics.median(t), min(t), max(t), repeats) for name, t in times.items()}


def fmt_ms(seconds: float) -> str:
    """Milliseconds with 3 significant digits or more (0.0201, 1.23, 123.45)."""
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.4f}"


def comparison_row(study: str, op: str, case: str, direction: str, baseline: str, ours: Timing, base: Timing,
                   **extra) -> dict:
    """One table row: our median/min-max against a baseline's, their ratio, and the numbers
    themselves (``ours_median_s``, ``baseline_median_s``, ``speedup_x``) for plots and checks."""
    return {
        "study": study, "op": op, "case": case, "direction": direction, "baseline": baseline,
        "ours_ms": fmt_ms(ours.median_s), "ours_range_ms": f"{fmt_ms(ours.min_s)}-{fmt_ms(ours.max_s)}",
        "baseline_ms": fmt_ms(base.median_s), "baseline_range_ms": f"{fmt_ms(base.min_s)}-{fmt_ms(base.max_s)}",
        "speedup": f"{base.median_s / ours.median_s:.2f}x",
        "ours_median_s": ours.median_s, "baseline_median_s": base.median_s,
        "speedup_x": base.median_s / ours.median_s, "repeats": ours.repeats, **extra,
    }


def memory_row(study: str, op: str, case: str, baseline: str, ours_bytes: int, base_bytes: int, **extra) -> dict:
    """One peak-memory row (``direction`` "peak memory"): MiB side by side and their ratio."""
    return {
        "study": study, "op": op, "case": case, "direction": "peak memory", "baseline": baseline,
        "ours_ms": f"{ours_bytes / 2**20:.1f} MiB", "baseline_ms": f"{base_bytes / 2**20:.1f} MiB",
        "speedup": _memory_ratio_text(ours_bytes / max(base_bytes, 1)),
        "ours_peak_bytes": ours_bytes, "baseline_peak_bytes": base_bytes,
        "memory_ratio": ours_bytes / max(base_bytes, 1), "repeats": 1, **extra,
    }


def _memory_ratio_text(ratio: float) -> str:
    return f"{ratio:.3f} ({1 / ratio:.0f}x less)" if 0 < ratio < 0.1 else f"{ratio:.2f} of baseline"


def in_fresh_process(function: str, *args, env: dict[str, str] | None = None, timeout: int = 3600):
    """``module.function(*args)`` (``function`` = ``"benchmarks.x:f"``, literal args) in a fresh
    Python with this process's thread count and ``env`` added to the environment; returns what it
    returns, through JSON. Peak memory on CPU is only meaningful per process image (docs/design.md
    §7); Triton's interpreter mode is fixed at import, so a compilation for the GPU needs a fresh
    process too."""
    module, name = function.split(":")
    code = (f"import json, torch; torch.set_num_threads({torch.get_num_threads()}); from {module} import {name}; "
            f"print(json.dumps({name}(*{args!r})))")
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), **(env or {}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"{function}{args} failed in its subprocess:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` = [(key, header), ...]."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, meta: dict, results: list[dict], table: str, targets: str = "",
                  figures: list[str] = ()) -> None:
    """results.json (meta + every row) and results.md (stamp, ceilings, table, targets, plots)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [f"# fastdiffinst benchmarks\n\n{meta['date']} · {meta['device']} · torch {meta['torch']} · "
             f"triton {meta['triton']} · torchvision {meta['torchvision']} · commit {meta['commit']}"
             f" · profile {meta.get('profile', '?')}\n"]
    if meta.get("ceilings"):
        lines.append("Measured ceilings: " + ", ".join(f"{k} {v:.3g}" for k, v in meta["ceilings"].items()) + "\n")
    lines.append(table + "\n")
    if targets:
        lines.append("Targets:\n\n" + targets + "\n")
    lines += [f"![{name}]({name})\n" for name in figures]
    (out_dir / "results.md").write_text("\n".join(lines))
