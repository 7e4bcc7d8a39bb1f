"""Turns a training run into a shipped model: ``NAME.pth`` + ``NAME.json`` in :mod:`fastdiffinst.zoo`.

    python -m fastdiffinst.zoo.export RUN NAME --description "..." --recipe "fastdiffinst train ..."

Evaluates the run's ``model_final.pth`` on the whole synthetic validation split (1 sampling step,
seed 0) in fp32, stores its weight matrices and kernels in fp16 when that keeps the segm AP and AP50
within :data:`FP16_AP_TOLERANCE` points (fp32 otherwise, and says so), evaluates what it stored,
records that model's predictions on the first :data:`SLICE_IMAGES` validation images and their AP
(what ``tests/test_zoo.py`` reproduces) and the score threshold the demo draws it with, and writes
the card with the recipe, the commit, the configuration and the run's training curve.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

from fastdiffinst.checkpoint import MODEL_FORMAT, atomic_save, load_model, read_checkpoint
from fastdiffinst.engine.evaluation import PER_CLASS, coco_metrics, predict_dataset
from fastdiffinst.zoo import FOLDER

FP16_AP_TOLERANCE = 0.2  # AP points fp16 storage may cost (segm AP and AP50), else fp32 is kept
SLICE_IMAGES = 4
SEED = 0  # the sampler's seed, as ``fastdiffinst eval`` uses by default
DATA = "synthetic"


def evaluate(model: torch.nn.Module, limit: int | None = None) -> tuple[dict, list[dict], int]:
    """``(metrics without the per-class tables, COCO results, image count)`` on the first ``limit`` synthetic
    validation images (all when None), as ``fastdiffinst eval`` computes them."""
    from fastdiffinst.data import dataset_from_spec

    dataset = dataset_from_spec(DATA, "val")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    results = predict_dataset(model, dataset, limit=count, generator=torch.Generator().manual_seed(SEED))
    metrics = coco_metrics(dataset.annotation_file, results, [e["id"] for e in dataset.images[:count]])
    metrics.pop(PER_CLASS)
    return metrics, results, count


def f1_best_threshold(results: list[dict]) -> float:
    """The score threshold with the best F1 of the synthetic validation masks at IoU 0.5: detections
    pooled over images and classes, a detection true when COCOeval matches it (segm, IoU 0.5, all
    areas, 100 per image). The demo draws the shipped model's instances from this score up."""
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from fastdiffinst.data import dataset_from_spec
    from fastdiffinst.data.coco import evaluation_ground_truth

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = evaluation_ground_truth(dataset_from_spec(DATA, "val").annotation_file)
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "segm")
        evaluator.params.imgIds = sorted({r["image_id"] for r in results})
        evaluator.evaluate()
    scores, true = [], []
    all_areas = evaluator.params.areaRng[0]
    for image in evaluator.evalImgs:
        if image is None or image["aRng"] != all_areas:
            continue
        ignored = np.asarray(image["dtIgnore"][0], dtype=bool)  # row 0: IoU 0.5
        scores += [s for s, skip in zip(image["dtScores"], ignored) if not skip]
        true += [bool(m) for m, skip in zip(image["dtMatches"][0], ignored) if not skip]
    ground_truth = sum(int(np.sum(~np.asarray(image["gtIgnore"], dtype=bool))) for image in evaluator.evalImgs
                       if image is not None and image["aRng"] == all_areas)
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.cumsum(np.asarray(true)[order])
    f1 = 2 * hits / (np.arange(1, len(order) + 1) + ground_truth)
    return float(np.asarray(scores)[order][int(np.argmax(f1))])


def half_precision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its fp32 weight matrices and kernels (2 or more dimensions: nearly all the
    bytes) in fp16; biases, normalisation parameters and statistics and the diffusion schedule's
    buffers (1-dimensional, a few kilobytes, each rounding of them shifts whole channels) stay fp32."""
    return {k: v.half() if v.dtype == torch.float32 and v.dim() >= 2 else v for k, v in state.items()}


def training_curve(run: Path) -> list[dict]:
    """The run's evaluations: iteration, training seconds so far, segm and bbox AP / AP50."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = {r["iter"]: r["train_s"] for r in records if "train_s" in r}
    return [{"iter": r["iter"], "train_s": seconds.get(r["iter"]),
             **{f"{kind}_{name}": r["eval"][kind][name] for kind in ("segm", "bbox") for name in ("AP", "AP50")}}
            for r in records if "eval" in r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a training run's folder (model_final.pth, metrics.jsonl)")
    parser.add_argument("name", help="the shipped model's name")
    parser.add_argument("--description", required=True, help="what the model is, in a few words")
    parser.add_argument("--recipe", required=True, action="append", help="a command of the recipe (repeatable)")
    parser.add_argument("--commit", help="the commit the run was trained at (default: git HEAD)")
    args = parser.parse_args(argv)
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           check=True, cwd=FOLDER).stdout.strip()

    source = args.run / "model_final.pth"
    model, names = load_model(source)
    fp32_metrics, _, images = evaluate(model)
    payload = read_checkpoint(source)
    target = FOLDER / f"{args.name}.pth"
    payload["model"] = half_precision(payload["model"])
    atomic_save(payload, target)
    target.chmod(0o644)  # atomic_save's temporary file is private; the package's files are readable
    stored, _ = load_model(target)
    metrics, results, _ = evaluate(stored)
    cost = {k: fp32_metrics["segm"][k] - metrics["segm"][k] for k in ("AP", "AP50")}
    storage = "fp16"
    if max(abs(v) for v in cost.values()) > FP16_AP_TOLERANCE:
        print(f"fp16 storage changes segm AP/AP50 by {cost}: storing fp32", file=sys.stderr)
        atomic_save(read_checkpoint(source), target)
        target.chmod(0o644)
        stored, storage = load_model(target)[0], "fp32"
        metrics, results, _ = evaluate(stored)
    slice_metrics, slice_results, _ = evaluate(stored, SLICE_IMAGES)

    card = {
        "name": args.name, "format": MODEL_FORMAT, "description": args.description,
        "class_names": names, "commit": commit, "recipe": args.recipe, "storage": storage,
        "file_bytes": target.stat().st_size, "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "evaluation": {"data": DATA, "split": "val", "images": images,
                       "sample_steps": stored.cfg.sampler.sample_steps, "seed": SEED, "unit": "percent"},
        "metrics": metrics, "metrics_fp32": fp32_metrics, "demo_score_threshold": round(f1_best_threshold(results), 3),
        "training_curve": training_curve(args.run),
        "slice": {"images": SLICE_IMAGES, "metrics": slice_metrics,
                  "predictions": [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")}
                                  for r in slice_results]},
        "config": payload["config"],
    }
    target.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
    print(f"{target} ({storage}, {card['file_bytes'] / 2**20:.1f} MiB): segm AP {metrics['segm']['AP']:.2f} "
          f"AP50 {metrics['segm']['AP50']:.2f} (fp32 {fp32_metrics['segm']['AP']:.2f} / "
          f"{fp32_metrics['segm']['AP50']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
