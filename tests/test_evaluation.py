"""Evaluation, model files and the eval/demo command line, end to end on a tiny synthetic split."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiffinst.checkpoint import CheckpointError, load_model, save_model
from fastdiffinst.cli import main
from fastdiffinst.config import get_config
from fastdiffinst.data import InstanceDataset
from fastdiffinst.data.synthetic import CLASSES, write_split
from fastdiffinst.engine.evaluation import (
    coco_metrics,
    format_metrics,
    format_per_class,
    instances_to_results,
    lvis_metrics,
)
from fastdiffinst.modeling import DiffusionInst


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("synthetic"), "val", 5)


@pytest.fixture(scope="module")
def dataset(split):
    return InstanceDataset(split / "annotations.json", split / "images")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pth"
    torch.manual_seed(0)
    save_model(DiffusionInst(get_config("tiny")), path, list(CLASSES))
    return path


def _gt_instances(sample, shift: int = 0):
    masks = torch.roll(sample["masks"].bool(), shifts=shift, dims=2)
    if shift:
        masks[:, :, :shift] = False
    boxes = sample["boxes"] + torch.tensor([shift, 0, shift, 0])
    return {"boxes": boxes, "labels": sample["labels"], "masks": masks,
            "scores": torch.linspace(1.0, 0.5, len(sample["labels"]))}


def test_perfect_predictions_give_ap_100_percent(dataset):
    category_ids = [c["id"] for c in dataset.categories]
    results = []
    for i in range(len(dataset)):
        results += instances_to_results(_gt_instances(dataset[i]), dataset.images[i]["id"], category_ids, 100)
    metrics = coco_metrics(dataset.annotation_file, results)
    assert metrics["bbox"]["AP"] == pytest.approx(100) and metrics["segm"]["AP"] == pytest.approx(100)
    assert metrics["segm"]["AP50"] == pytest.approx(100)
    assert all(ap == pytest.approx(100) or ap == -1 for ap in metrics["per_class"]["segm"].values())
    assert "| segm | 100.00" in format_metrics(metrics)


def test_shifted_predictions_match_pycocotools_directly(dataset):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    category_ids = [c["id"] for c in dataset.categories]
    ours, direct = [], []
    for i in range(len(dataset)):
        sample, image_id = dataset[i], dataset.images[i]["id"]
        instances = _gt_instances(sample, shift=6)
        ours += instances_to_results(instances, image_id, category_ids, 100)
        for box, label, mask, score in zip(instances["boxes"], instances["labels"], instances["masks"],
                                           instances["scores"]):
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            x1, y1, x2, y2 = box.tolist()
            direct.append({"image_id": image_id, "category_id": category_ids[int(label)], "score": float(score),
                           "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle})
    metrics = coco_metrics(dataset.annotation_file, ours)
    gt = COCO(str(dataset.annotation_file))
    for iou_type in ("bbox", "segm"):
        evaluator = COCOeval(gt, gt.loadRes(direct), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert metrics[iou_type]["AP"] == pytest.approx(100 * evaluator.stats[0])  # percent
        assert metrics[iou_type]["AP75"] == pytest.approx(100 * evaluator.stats[2])
    assert 0 < metrics["segm"]["AP"] < 100


def test_at_most_max_dets_per_image_by_score():
    instances = {"boxes": torch.tensor([[0.0, 0, 4, 4]] * 5), "labels": torch.zeros(5, dtype=torch.int64),
                 "masks": torch.ones(5, 6, 6, dtype=torch.bool), "scores": torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])}
    results = instances_to_results(instances, 3, [11], max_dets=3)
    assert [r["score"] for r in results] == pytest.approx([0.9, 0.7, 0.5])
    assert results[0]["category_id"] == 11 and results[0]["bbox"] == [0.0, 0.0, 4.0, 4.0]


def test_lvis_evaluation_needs_the_package(tmp_path):
    try:
        import lvis  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install"):
            lvis_metrics(tmp_path / "lvis.json", [])
    else:
        pytest.skip("the lvis package is installed")


def test_model_files_round_trip_and_official_checkpoints_need_a_preset(checkpoint, tmp_path):
    model, names = load_model(checkpoint)
    assert names == list(CLASSES) and not model.training
    torch.manual_seed(0)
    reference = DiffusionInst(get_config("tiny"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    official = tmp_path / "official.pth"
    torch.save({"model": {"head.time_mlp.1.weight": torch.zeros(1)}}, official)
    with pytest.raises(CheckpointError, match="--config"):
        load_model(official)
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(official, "tiny")


def test_eval_cli_end_to_end(checkpoint, split, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTDIFFINST_DATA", str(tmp_path / "data"))
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", "synthetic:3", "--out", str(out),
                 "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| bbox |" in printed and "| segm |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and set(metrics["metrics"]) == {"bbox", "segm"}
    assert set(metrics["metrics"]["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert metrics["unit"] == "percent" and metrics["undefined"] == -1 and metrics["split"] == "val"
    assert set(metrics["per_class"]) == {"bbox", "segm"} and set(metrics["per_class"]["segm"]) == set(CLASSES)
    assert all(v == -1 or 0 <= v <= 100 for v in metrics["per_class"]["segm"].values())
    assert "per-class segm AP (%):" in printed and "per-class bbox AP (%):" in printed and "percent" in printed
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and all(len([p for p in predictions if p["image_id"] == i]) <= 100 for i in (1, 2, 3))


def test_eval_cli_on_a_json_and_image_folder(checkpoint, split, tmp_path, capsys):
    out = tmp_path / "eval"
    spec = f"coco:{split / 'annotations.json'}:{split / 'images'}"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", spec, "--limit", "1", "--out", str(out),
                 "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"{spec} (1 images)" in printed and "per-class segm AP (%):" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == spec and metrics["split"] is None and metrics["unit"] == "percent"
    assert list(metrics["per_class"]["bbox"]) == list(CLASSES)  # class names from the json
    wrong = tmp_path / "one_class.json"
    data = json.loads((split / "annotations.json").read_text())
    wrong.write_text(json.dumps({**data, "categories": data["categories"][:1],
                                 "annotations": [a for a in data["annotations"]
                                                 if a["category_id"] == data["categories"][0]["id"]]}))
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", f"coco:{wrong}:{split / 'images'}"]) == 2
    assert "classes but" in capsys.readouterr().err


def _hand_made_ground_truth(path):
    """Two 20x20 images; "cat" on both, "dog" on the first, no "bird"; RLE masks of squares."""
    from pycocotools import mask as mask_utils

    def square(x, y, side):
        mask = np.zeros((20, 20), np.uint8)
        mask[y:y + side, x:x + side] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        return {"bbox": [x, y, side, side], "segmentation": rle, "area": side * side}

    objects = [(1, 1, square(2, 2, 8)), (2, 1, square(5, 5, 10)), (1, 2, square(12, 12, 6))]
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": 20, "width": 20} for i in (1, 2)],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}],
            "annotations": [{"id": n, "image_id": image, "category_id": cat, "iscrowd": 0, **shape}
                            for n, (image, cat, shape) in enumerate(objects, 1)]}
    path.write_text(json.dumps(data))
    return data


def test_per_class_ap_table(tmp_path):
    path = tmp_path / "gt.json"
    data = _hand_made_ground_truth(path)
    cats = [a for a in data["annotations"] if a["category_id"] == 1]
    # Both cats found exactly, the dog missed, a bird (no ground truth) detected on image 2.
    results = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "segmentation": a["segmentation"],
                "score": 0.9} for a in cats]
    results.append({"image_id": 2, "category_id": 3, "bbox": [0, 0, 4, 4], "score": 0.5,
                    "segmentation": data["annotations"][0]["segmentation"]})
    metrics = coco_metrics(path, results)
    for task in ("bbox", "segm"):
        assert metrics["per_class"][task] == {"cat": pytest.approx(100), "dog": 0.0, "bird": -1.0}
        assert metrics[task]["AP"] == pytest.approx(50)  # COCOeval's mean over the classes with ground truth
    table = format_per_class(metrics)
    assert table.splitlines()[:4] == ["per-class bbox AP (%):", "| class | AP | class | AP | class | AP |",
                                      "|---|---|---|---|---|---|", "| cat | 100.00 | dog | 0.00 | bird | – |"]
    assert "per-class segm AP (%):" in table
    assert "| segm | 50.00 |" in format_metrics(metrics) and "cat" not in format_metrics(metrics)
    # Two columns a row: a short last row is padded.
    assert format_per_class(metrics, columns=2).splitlines()[3:5] == ["| cat | 100.00 | dog | 0.00 |",
                                                                      "| bird | – |  |  |"]


def test_an_empty_result_list_gives_valid_tables(tmp_path):
    path = tmp_path / "gt.json"
    _hand_made_ground_truth(path)
    metrics = coco_metrics(path, [])
    assert metrics["segm"]["AP"] == 0 and metrics["per_class"]["segm"] == {"cat": 0.0, "dog": 0.0, "bird": -1.0}
    assert "| segm | 0.00 | 0.00 |" in format_metrics(metrics)
    assert "| cat | 0.00 | dog | 0.00 | bird | – |" in format_per_class(metrics)
    only_second = coco_metrics(path, [], image_ids=[2])  # the dog is on image 1
    assert only_second["per_class"]["bbox"] == {"cat": 0.0, "dog": -1.0, "bird": -1.0}


def test_demo_cli_end_to_end(checkpoint, split, tmp_path, monkeypatch):
    from PIL import Image

    out = tmp_path / "pictures"
    assert main(["demo", "--checkpoint", str(checkpoint), "--input", str(split / "images"), "--out", str(out),
                 "--score-threshold", "0"]) == 0
    pictures = sorted(out.glob("*.png"))
    assert [p.name for p in pictures] == sorted(p.name for p in (split / "images").glob("*.png"))
    with Image.open(pictures[0]) as picture, Image.open(split / "images" / pictures[0].name) as original:
        assert picture.size == original.size
        assert not np.array_equal(np.asarray(picture), np.asarray(original.convert("RGB")))  # something drawn
    monkeypatch.setenv("FASTDIFFINST_DATA", str(tmp_path / "data"))
    assert main(["demo", "--checkpoint", str(checkpoint), "--synthetic", "1", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "synthetic-00000.png").is_file()


def test_cli_bad_input_gives_a_message_and_status_2(checkpoint, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pth"), "--data", "synthetic:2"]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", f"coco:{tmp_path / 'nowhere'}"]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--checkpoint", str(checkpoint), "--input", str(tmp_path), "--out", str(blocker / "x")]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
    assert main(["demo", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "none.png"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    # Without --checkpoint only the synthetic set has a model (the shipped one, tests/test_zoo.py).
    assert main(["eval", "--data", f"coco:{tmp_path}"]) == 2
    assert "argument --checkpoint: required except on the synthetic set" in capsys.readouterr().err
    assert main(["demo", "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "argument --checkpoint: required except on the synthetic set" in capsys.readouterr().err


def test_module_entry_point():
    run = subprocess.run([sys.executable, "-m", "fastdiffinst", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "eval" in run.stdout and "demo" in run.stdout
