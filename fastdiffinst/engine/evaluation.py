"""COCO-style evaluation of DiffusionInst: boxes and masks through pycocotools' COCOeval, LVIS
through the ``lvis`` package (``pip install lvis``, an optional extra).

:func:`predict_dataset` runs the model over a dataset (test resize, results at each image's
original size) and returns COCO result entries (``bbox`` xywh, RLE ``segmentation``, ``score``,
original ``category_id``), at most ``max_dets`` per image by score (100 for COCO, 300 for LVIS).
:func:`coco_metrics` evaluates them; :func:`format_metrics` prints a table.
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

from fastdiffinst.data.coco import InstanceDataset
from fastdiffinst.data.transforms import resize_for_test
from fastdiffinst.progress import ProgressBar

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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
    cfg = model.cfg.input
    count = len(dataset) if limit is None else min(limit, len(dataset))
    category_ids = [c["id"] for c in dataset.categories]
    results: list[dict] = []
    starts = range(0, count, batch_size)
    with ProgressBar(len(starts), "eval", "batch", enabled=progress) as bar:
        for start in starts:
            indices = range(start, min(start + batch_size, count))
            images, sizes = [], []
            for index in indices:
                image = dataset.load_image(index)
                images.append(resize_for_test(image, cfg.min_size_test, cfg.max_size_test))
                sizes.append((int(image.shape[1]), int(image.shape[2])))
            outputs = model(images, output_sizes=sizes, generator=generator)
            for index, instances in zip(indices, outputs):
                results += instances_to_results(instances, dataset.images[index]["id"], category_ids, max_dets)
            bar.update()
    return results


def coco_metrics(annotation_file: str | Path, results: list[dict], image_ids: Sequence[int] | None = None,
                 iou_types: Sequence[str] = ("bbox", "segm")) -> dict[str, dict[str, float]]:
    """COCOeval of ``results`` against ``annotation_file`` -> ``{"bbox": {"AP": ..., ...}, "segm": ...}``
    (fractions in [0, 1]; -1 where pycocotools has no value, e.g. no small objects)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
    metrics = {}
    for iou_type in iou_types:
        if not results:
            metrics[iou_type] = {name: 0.0 for name in METRICS}
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
        metrics[iou_type] = {name: float(v) for name, v in zip(METRICS, evaluator.stats[:6])}
    return metrics


def lvis_metrics(annotation_file: str | Path, results: list[dict],
                 iou_types: Sequence[str] = ("bbox", "segm")) -> dict[str, dict[str, float]]:
    """LVIS evaluation (``lvis`` package) -> AP, AP50, AP75, APs/m/l, APr/c/f per IoU type."""
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
        metrics[iou_type] = {k: float(v) for k, v in evaluator.get_results().items()}
    return metrics


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """A markdown table, one row per IoU type, values in percent ("–" where undefined)."""
    names = list(next(iter(metrics.values())).keys())
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task, values in metrics.items():
        # pycocotools reports -1 where a metric has no ground truth (e.g. no large objects).
        lines.append(f"| {task} | " + " | ".join("–" if values[n] < 0 else f"{100 * values[n]:.2f}" for n in names)
                     + " |")
    return "\n".join(lines)


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
