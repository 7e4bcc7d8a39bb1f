"""Peak memory and time of one DiffusionInst training step (forward + backward), on the fused ops
vs the official formulations, each with and without recomputation (``DiffusionInst(recompute=)``;
the defaults are fused + recomputation and the official formulation without), each in a fresh
process (docs/design.md §7).

    python -m benchmarks.training_memory                       # r50_coco, 2 × 512², 500 proposals
    python benchmarks/training_memory.py --preset tiny --size 256 --batch 4

Run as a file, this script runs itself again as the ``benchmarks`` package's module
(``python -m benchmarks.training_memory``, the repository root importable), as benchmarks/run.py does.

The same random weights (seeded) and the same batch (random images with 10 rectangular GT
instances each) on both sides. On CPU the peak is VmHWM minus the RSS once the model and the
batch are built; on GPU ``torch.cuda.max_memory_allocated`` above the allocations before the step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/training_memory.py`: run again as the package's module, same arguments
    _root = str(Path(__file__).resolve().parents[1])
    _env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")])))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.training_memory", *sys.argv[1:]], _env)

import torch

from benchmarks.harness import in_fresh_process, peak_rss_bytes, rss_bytes, time_fn

GT_PER_IMAGE = 10


def _batch(size: int, batch: int, num_classes: int):
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8))
        boxes, masks = [], torch.zeros(GT_PER_IMAGE, size, size, dtype=torch.uint8)
        for i in range(GT_PER_IMAGE):
            x, y = torch.randint(0, size * 3 // 4, (2,), generator=g).tolist()
            w, h = torch.randint(size // 25, size // 5, (2,), generator=g).tolist()
            boxes.append([x, y, x + w, y + h])
            masks[i, y:y + h, x:x + w] = 1
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.randint(0, num_classes, (GT_PER_IMAGE,), generator=g), "masks": masks})
    return images, targets


def measure(ops_impl: str, recompute: bool, preset: str, size: int, batch: int, proposals: int, device: str,
            repeats: int = 0, warmup: int = 0, precision: str = "fp32") -> dict:
    """Training steps in this process: the first one's peak bytes above the inputs (model and
    batch built), its time and total loss; with ``repeats``, the step time by the docs/design.md §7
    protocol (``warmup`` steps first; gradients set to None before each step, as a training loop's
    ``zero_grad``). ``precision`` "bf16"/"fp16": mixed precision (the model's autocast)."""
    from fastdiffinst.config import get_config, replace_path
    from fastdiffinst.modeling import DiffusionInst

    torch.manual_seed(0)
    cfg = replace_path(get_config(preset), "num_proposals", proposals)
    model = DiffusionInst(cfg, ops_impl=ops_impl, recompute=recompute, precision=precision).to(device).train()
    images, targets = _batch(size, batch, cfg.num_classes)
    cuda = device.startswith("cuda")

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        total = sum(model(images, targets, generator=torch.Generator().manual_seed(1)).values())
        total.backward()
        return total

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    start = time.perf_counter()
    total = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else peak_rss_bytes() - base
    timing = time_fn(step, device, repeats, warmup).as_dict() if repeats else None
    return {"ops_impl": ops_impl, "recompute": recompute, "precision": precision, "peak_bytes": peak,
            "seconds": seconds,
            "loss": float(total.detach()), "step": timing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="r50_coco")
    parser.add_argument("--size", type=int, default=512, help="square image side (pixels)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--proposals", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA device is available")
    torch.set_num_threads(args.threads)
    rows = [in_fresh_process("benchmarks.training_memory:measure", ops_impl, recompute, args.preset, args.size,
                             args.batch, args.proposals, args.device)
            for ops_impl, recompute in (("fused", True), ("reference", False), ("fused", False), ("reference", True))]
    fused, reference = rows[:2]
    print(f"{args.preset}, {args.batch} × {args.size}², {args.proposals} proposals, {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print("| ops_impl | recompute | peak memory | first step time | loss |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['ops_impl']} | {row['recompute']} | {row['peak_bytes'] / 2**20:.0f} MiB | "
              f"{row['seconds']:.2f} s | {row['loss']:.4f} |")
    print(f"defaults, fused / reference: peak memory {fused['peak_bytes'] / reference['peak_bytes']:.2f}, "
          f"first step time {fused['seconds'] / reference['seconds']:.2f} (one cold step; "
          f"python -m benchmarks.run --studies model_training times warm steps)")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
