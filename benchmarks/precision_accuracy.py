"""The accuracy cost of half precision, measured: a trained model evaluated in fp32, bf16, bf16
compiled and fp16 on the same images with the same random boxes, and the per-stage drift of bf16 against
fp32 on ``r50_coco`` with random weights.

    python benchmarks/precision_accuracy.py --out benchmarks/results/STAMP-precision-accuracy

writes ``accuracy.json`` (every variant's COCO metrics in percent, seconds, the gate) and
``drift.json`` (relative L2 of each pyramid level, the mask features and each decoder stage's
logits, boxes and filters). The gate (docs/precision.md): segm AP and box AP of every half-precision
variant within 0.5 points of fp32.

On a CPU without bf16 matrix instructions (``fastdiffinst.modeling.precision.emulation_reason``)
bf16 runs on ATen's fallback kernels: the same arithmetic (bf16 operands, fp32 accumulation, bf16
results), tens of times slower; the accuracy measured there is the accuracy of bf16, the seconds are
not its speed (both are recorded with the CPU's name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: the repository root importable, for the benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness
from fastdiffinst.checkpoint import load_model
from fastdiffinst.config import get_config
from fastdiffinst.data import dataset_from_spec
from fastdiffinst.engine import evaluation
from fastdiffinst.modeling import DiffusionInst
from fastdiffinst.modeling.precision import emulation_reason, precision_dtype

GATE_POINTS = 0.5
VARIANTS = ("fp32", "bf16", "bf16+compile", "fp16")


def evaluate_variants(model_name: str, data: str, limit: int | None, variants: list[str], seed: int) -> dict:
    """Each variant's COCO metrics (percent) and seconds on ``data``'s validation split."""
    base, _ = load_model(model_name)
    dataset = dataset_from_spec(data, "val")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    image_ids = [entry["id"] for entry in dataset.images[:count]]
    report = {}
    for variant in variants:
        precision, _, compiled = variant.partition("+")
        model = DiffusionInst(base.cfg, compile=bool(compiled), precision=precision).eval()
        model.load_state_dict(base.state_dict())
        start = time.perf_counter()
        results = evaluation.predict_dataset(model, dataset, limit=limit, progress=True,
                                             generator=torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - start
        metrics = evaluation.coco_metrics(dataset.annotation_file, results, image_ids)
        metrics.pop(evaluation.PER_CLASS, None)
        report[variant] = {"metrics": metrics, "seconds": round(seconds, 1), "images": count,
                           "detections": len(results)}
        print(f"{variant}: segm AP {metrics['segm']['AP']:.2f} AP50 {metrics['segm']['AP50']:.2f}, "
              f"bbox AP {metrics['bbox']['AP']:.2f} ({seconds:.0f} s)", flush=True)
    reference = report["fp32"]["metrics"] if "fp32" in report else None
    for variant, entry in report.items():
        if reference is None or variant == "fp32":
            continue
        deltas = {kind: {k: round(entry["metrics"][kind][k] - reference[kind][k], 2) for k in ("AP", "AP50", "AP75")}
                  for kind in ("segm", "bbox")}
        entry["delta_vs_fp32"] = deltas
        entry["gate_passed"] = all(abs(deltas[kind]["AP"]) <= GATE_POINTS for kind in ("segm", "bbox"))
    return report


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm())


@torch.no_grad()
def stage_drift(size: int, proposals: int, seed: int) -> dict:
    """bf16 against fp32 on ``r50_coco`` with random weights, one ``size``² image, ``proposals``
    random boxes fed to both (teacher-forced, so that each stage's drift is its own and its
    inputs'): relative L2 of P2–P6, the mask features and each stage's outputs."""
    torch.manual_seed(seed)
    cfg = get_config("r50_coco")
    model = DiffusionInst(cfg).eval()
    image = torch.randint(0, 256, (3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    batch = model.preprocess([image])
    xy = torch.rand(1, proposals, 2, generator=torch.Generator().manual_seed(seed + 1)) * size * 0.7
    wh = torch.rand(1, proposals, 2, generator=torch.Generator().manual_seed(seed + 2)) * size * 0.3 + 8
    boxes = torch.cat([xy, xy + wh], dim=-1)
    t = torch.tensor([999])
    outputs = {}
    for precision in ("fp32", "bf16"):
        model.set_precision(precision)
        features = model.extract_features(batch.tensor)
        head = model.run_head(features, boxes, t)
        outputs[precision] = (features, head)
    (f32, h32), (f16, h16) = outputs["fp32"], outputs["bf16"]
    drift = {f"P{level + 2}": _rel(a, b) for level, (a, b) in enumerate(zip(f16.pyramid, f32.pyramid))}
    drift["mask_feats"] = _rel(f16.mask_feats, f32.mask_feats)
    for stage in range(h32.class_logits.shape[0]):
        drift[f"stage{stage}"] = {"class_logits": _rel(h16.class_logits[stage], h32.class_logits[stage]),
                                  "boxes": _rel(h16.boxes[stage], h32.boxes[stage]),
                                  "kernels": _rel(h16.kernels[stage], h32.kernels[stage])}
    return {"preset": "r50_coco", "image": [size, size], "proposals": proposals, "seed": seed,
            "unit_roundoff_bf16": 2.0**-8, "relative_l2": drift}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="tiny-synthetic", help="a shipped model's name or a model file")
    parser.add_argument("--data", default="synthetic", help="the data set whose validation split is evaluated")
    parser.add_argument("--limit", type=int, help="the first N validation images only")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drift-size", type=int, default=512, help="image side of the r50_coco drift study (0: skip)")
    parser.add_argument("--drift-proposals", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant not in VARIANTS:
            parser.error(f"--variants: {variant!r} is not one of {VARIANTS}")
        precision_dtype(variant.partition("+")[0])
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = {**harness.stamp("cpu"), "bf16": emulation_reason("bf16", "cpu") or "native (oneDNN bf16 kernels)"}
    report = {"stamp": stamp, "model": args.model, "data": args.data, "seed": args.seed,
              "gate_points": GATE_POINTS,
              "variants": evaluate_variants(args.model, args.data, args.limit, variants, args.seed)}
    (args.out / "accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.drift_size > 0:
        drift = {"stamp": stamp, **stage_drift(args.drift_size, args.drift_proposals, args.seed)}
        (args.out / "drift.json").write_text(json.dumps(drift, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
