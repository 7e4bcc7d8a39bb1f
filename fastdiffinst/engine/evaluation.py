"""COCO-style evaluation of DiffusionInst: boxes and masks through pycocotools' COCOeval, LVIS
through the ``lvis`` package (``pip install lvis``, an optional extra).

:func:`predict_dataset` runs the model over a dataset (test resize, results at each image's
original size) and returns COCO result entries (``bbox`` xywh, RLE ``segmentation``, ``score``,
original ``category_id``), at most ``max_dets`` per image by score (100 for COCO, 300 for LVIS).
:func:`coco_metrics` evaluates them; :func:`format_metrics` prints the summary table and
:func:`format_per_class` the per-class AP tables.

Every AP is in percent (``UNIT``), as detectron2 reports it: returned, printed, written to
``metrics.json`` (which says so in its ``"unit"`` entry) and to a training run's ``metrics.jsonl``.
An AP without ground truth to measure it (no small objects for APs, no instance of a class) is
``-1`` (pycocotools' convention), printed as "–".
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastdiffinst.data.coco import InstanceDataset, category_name, evaluation_ground_truth
from fastdiffinst.predictor import predict_batch
from fastdiffinst.progress import ProgressBar

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
UNIT = "percent"
# What metrics.json says about its numbers.
UNIT_NOTE = "percent: every AP in [0, 100]; -1 where undefined (no ground truth of that size or class)"
# The key of coco_metrics' per-class APs, beside the IoU types.
PER_CLASS = "per_class"


def _percent(value: float) -> float:
    """A pycocotools / LVIS fraction in percent; -1 (undefined) stays -1."""
    return 100 * float(value) if value >= 0 else -1.0


def instances_to_results(instances: dict[str, Tensor], image_id: int, category_ids: Sequence[int],
                         max_dets: int) -> list[dict]:
    """One image's model output -> COCO result entries (the ``max_dets`` best by score)."""
    from pycocotools import mask as mask_utils

    scores = instances["scores"].float().cpu()
    order = torch.argsort(scores, descending=True, stable=True)[:max_dets]
    boxes = instances["boxes"].float().cpu()[order]
    masks = instances["masks"].cpu()[order].numpy().astype(np.uint8)
    labels = instances["labels"].cpu()[order].tolist()
    results = []
    for i, index in enumerate(order.tolist()):
        x1, y1, x2, y2 = boxes[i].tolist()
        rle = mask_utils.encode(np.asfortranarray(masks[i]))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": image_id, "category_id": int(category_ids[labels[i]]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[index]), "segmentation": rle})
    return results


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, dataset: InstanceDataset, max_dets: int = 100, batch_size: int = 1,
                    limit: int | None = None, generator: torch.Generator | None = None,
                    progress: bool = False) -> list[dict]:
    """COCO results of ``model`` (eval mode) on the first ``limit`` images of ``dataset``; images
    are resized to the model's test size and results reported at their original size."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    category_ids = [c["id"] for c in dataset.categories]
    results: list[dict] = []
    starts = range(0, count, batch_size)
    with ProgressBar(len(starts), "eval", "batch", enabled=progress) as bar:
        for start in starts:
            indices = range(start, min(start + batch_size, count))
            outputs = predict_batch(model, [dataset.load_image(index) for index in indices], generator=generator)
            for index, instances in zip(indices, outputs):
                results += instances_to_results(instances, dataset.images[index]["id"], category_ids, max_dets)
            bar.update()
    return results


def coco_metrics(annotation_file: str | Path, results: list[dict], image_ids: Sequence[int] | None = None,
                 iou_types: Sequence[str] = ("bbox", "segm")) -> dict[str, dict]:
    """COCOeval of ``results`` against ``annotation_file``, in percent ->
    ``{"bbox": {"AP": ..., "AP50": ..., ...}, "segm": {...}, "per_class": {"bbox": {name: AP}, "segm": {...}}}``.

    The summary is COCOeval's ``stats[:6]``; -1 where pycocotools has no value (e.g. no small
    objects). A class's AP is detectron2's: the mean of ``eval["precision"]`` over the IoU thresholds
    and recall points at area "all" and 100 detections, -1 for a class without ground truth in the
    evaluated images. Classes are named by the json's categories (``name``, else the id). Without
    any result every AP is 0 (a class without ground truth: -1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = evaluation_ground_truth(annotation_file)  # iscrowd and area filled in where absent
        gt.createIndex()
    names = _class_names(gt.dataset.get("categories", []))
    metrics: dict[str, dict] = {}
    per_class: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if not results:  # pycocotools' loadRes cannot read an empty list
            metrics[iou_type] = {name: 0.0 for name in METRICS}
            evaluated = None if image_ids is None else set(image_ids)
            with_gt = {a["category_id"] for a in gt.dataset["annotations"]
                       if not a.get("iscrowd", 0) and (evaluated is None or a["image_id"] in evaluated)}
            per_class[iou_type] = {name: 0.0 if cat_id in with_gt else -1.0 for cat_id, name in names.items()}
            continue
        entries = results if iou_type == "segm" else [{k: v for k, v in r.items() if k != "segmentation"}
                                                      for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            detections = gt.loadRes(entries)
            evaluator = COCOeval(gt, detections, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {name: _percent(v) for name, v in zip(METRICS, evaluator.stats[:6])}
        per_class[iou_type] = per_class_ap(evaluator.eval["precision"], evaluator.params.catIds, names)
    metrics[PER_CLASS] = per_class
    return metrics


def _class_names(categories: list[dict]) -> dict[int, str]:
    """Category id -> name (the id where a category has no name; a repeated name gets its id too)."""
    names = {c["id"]: category_name(c) for c in sorted(categories, key=lambda c: c["id"])}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {cat_id: name if counts[name] == 1 else f"{name} (id {cat_id})" for cat_id, name in names.items()}


def per_class_ap(precision: np.ndarray, category_ids: Sequence[int], names: dict[int, str]) -> dict[str, float]:
    """Each class's AP in percent from COCOeval's ``eval["precision"]`` ``[T, R, K, A, M]``: the mean
    over IoU thresholds and recall points of the defined (> -1) precisions at area "all" (index 0)
    and the last ``maxDets`` (100); -1 where none is defined (no ground truth)."""
    aps = {}
    for k, cat_id in enumerate(category_ids):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        aps[names.get(cat_id, str(cat_id))] = float(100 * values.mean()) if values.size else -1.0
    return aps


def lvis_metrics(annotation_file: str | Path, results: list[dict],
                 iou_types: Sequence[str] = ("bbox", "segm")) -> dict[str, dict[str, float]]:
    """LVIS evaluation (``lvis`` package) -> AP, AP50, AP75, APs/m/l, APr/c/f per IoU type, in percent."""
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError:
        raise RuntimeError("LVIS evaluation needs the lvis package: pip install -r requirements-lvis.txt "
                           "(or pip install 'fastdiffinst[lvis]')") from None
    metrics = {}
    gt = LVIS(str(annotation_file))
    for iou_type in iou_types:
        evaluator = LVISEval(gt, LVISResults(gt, results, max_dets=300), iou_type)
        evaluator.run()
        metrics[iou_type] = {k: _percent(v) for k, v in evaluator.get_results().items()}
    return metrics


def format_metrics(metrics: dict[str, dict]) -> str:
    """A markdown table, one row per IoU type, values in percent ("–" where undefined); the
    per-class entry is left to :func:`format_per_class`."""
    tasks = {task: values for task, values in metrics.items() if task != PER_CLASS}
    names = list(next(iter(tasks.values())).keys())
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task, values in tasks.items():
        lines.append(f"| {task} | " + " | ".join(_cell(values[n]) for n in names) + " |")
    return "\n".join(lines)


def format_per_class(metrics: dict[str, dict], columns: int = 3) -> str:
    """detectron2's per-category tables: for each IoU type, "per-class {type} AP (%)" and a markdown
    table of ``columns`` (class, AP) pairs a row, "–" where a class has no ground truth; "" when
    ``metrics`` has no per-class entry."""
    blocks = []
    for task, aps in metrics.get(PER_CLASS, {}).items():
        cells = [(name.replace("|", "\\|"), _cell(ap)) for name, ap in aps.items()]
        pairs = min(columns, max(len(cells), 1))
        lines = [f"per-class {task} AP (%):", "|" + " class | AP |" * pairs, "|" + "---|---|" * pairs]
        for start in range(0, len(cells), pairs):
            row = cells[start:start + pairs]
            row += [("", "")] * (pairs - len(row))
            lines.append("|" + "".join(f" {name} | {ap} |" for name, ap in row))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _cell(value: float) -> str:
    """An AP in percent for a table: "–" where undefined (pycocotools' -1, or NaN)."""
    return "–" if not value >= 0 else f"{value:.2f}"


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
