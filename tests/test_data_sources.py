"""The ``--data`` / ``--val-data`` specs: ``coco:ANNOTATIONS.json:IMAGES_DIR`` (any COCO-format data
set) beside ``coco:ROOT``, its errors, class names from the json, and ``train --data A --val-data B``
end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastdiffinst.cli import main
from fastdiffinst.data import DatasetError, dataset_from_spec
from fastdiffinst.data.sources import coco_json_spec, is_split_independent

# A small model and input size (as tests/test_train.py's SMALL).
SMALL = ["head.num_stages=2", "num_proposals=16", "solver.ims_per_batch=2", "solver.warmup_iters=2",
         "input.min_size_train=(96,128)", "input.max_size_train=160", "input.crop_resize=(96,)",
         "input.crop_size=(64,96)", "input.min_size_test=96", "input.max_size_test=160"]


def write_coco(json_path: Path, image_dir: Path, count: int = 2, categories: list[dict] | None = None,
               seed: int = 0) -> tuple[Path, Path]:
    """``count`` random 64x80 PNGs in ``image_dir`` and a COCO json at ``json_path``: one box-shaped
    instance of the first category on the first image, the others empty."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(image_dir / f"img{i}.png")
        images.append({"id": i + 1, "file_name": f"img{i}.png", "height": 64, "width": 80})
    mask = np.zeros((64, 80), np.uint8)
    mask[10:40, 20:60] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    categories = categories or [{"id": 3, "name": "crate"}]
    annotations = [{"id": 1, "image_id": 1, "category_id": categories[0]["id"], "bbox": [20, 10, 40, 30],
                    "iscrowd": 0, "segmentation": rle, "area": 1200}]
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_path, image_dir


def test_coco_json_spec_parsing():
    assert coco_json_spec("coco:/d/train.json:/d/images") == (Path("/d/train.json"), Path("/d/images"))
    # Split at the first ".json:": the image folder may hold a ':'.
    assert coco_json_spec("coco:a.json:C:/imgs") == (Path("a.json"), Path("C:/imgs"))
    assert coco_json_spec("coco:/datasets/coco") is None and coco_json_spec("coco:/x:y") is None
    assert coco_json_spec("synthetic:4") is None and coco_json_spec("lvis:/x.json:y") is None
    for bad in ("coco:.json:imgs", "coco:a.json:"):
        with pytest.raises(DatasetError, match="needs both the json file and the image folder"):
            coco_json_spec(bad)
    assert is_split_independent("coco:a.json:imgs") and not is_split_independent("coco:/datasets/coco")
    assert not is_split_independent("synthetic")


def test_json_and_folder_spec_is_the_same_data_for_both_splits(tmp_path):
    json_path, images = write_coco(tmp_path / "ann" / "custom.json", tmp_path / "pictures", count=3,
                                   categories=[{"id": 3, "name": "crate"}, {"id": 1, "name": "pallet"}])
    spec = f"coco:{json_path}:{images}"
    train, val = dataset_from_spec(spec, "train"), dataset_from_spec(spec, "val")
    assert len(train) == len(val) == 3 and train.annotation_file == val.annotation_file == json_path
    assert train.image_root == images
    assert train.class_names == ["pallet", "crate"]  # from the json, in id order
    sample = train[0]
    assert sample["image"].shape == (3, 64, 80) and sample["labels"].tolist() == [1]
    # A relative spec, with a ':' in the image folder's name.
    odd = tmp_path / "a:b"
    write_coco(tmp_path / "odd.json", odd)
    assert len(dataset_from_spec(f"coco:{tmp_path / 'odd.json'}:{odd}", "val")) == 2


def test_coco_root_layout_still_works(tmp_path):
    write_coco(tmp_path / "annotations" / "instances_val2017.json", tmp_path / "val2017")
    dataset = dataset_from_spec(f"coco:{tmp_path}", "val")
    assert len(dataset) == 2 and dataset.class_names == ["crate"]
    with pytest.raises(DatasetError, match=r"coco:.*image folder not found: .*train2017"):
        dataset_from_spec(f"coco:{tmp_path}", "train")
    (tmp_path / "train2017").mkdir()
    with pytest.raises(DatasetError, match=r"coco:.*annotation file not found: .*instances_train2017.json"):
        dataset_from_spec(f"coco:{tmp_path}", "train")


def test_bad_json_and_folder_specs_name_the_spec_and_what_is_missing(tmp_path):
    json_path, images = write_coco(tmp_path / "a.json", tmp_path / "imgs")
    cases = [(f"coco:{tmp_path / 'missing.json'}:{images}", "annotation file not found: .*missing.json"),
             (f"coco:{json_path}:{tmp_path / 'nowhere'}", "image folder not found: .*nowhere"),
             (f"coco:{json_path}", "needs its image folder: coco:ANNOTATIONS.json:IMAGES_DIR"),
             (f"coco:{tmp_path / 'x'}.json:", "needs both the json file and the image folder")]
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    cases.append((f"coco:{no_images}:{images}", "no images in .*no_images.json"))
    not_json = tmp_path / "broken.json"
    not_json.write_text("{")
    cases.append((f"coco:{not_json}:{images}", "broken.json is not valid json"))
    for spec, message in cases:
        with pytest.raises(DatasetError, match=message) as error:
            dataset_from_spec(spec, "val")
        assert spec in str(error.value), (spec, str(error.value))
    with pytest.raises(DatasetError, match="coco:ANNOTATIONS.json:IMAGES_DIR"):
        dataset_from_spec("imagenet:/x", "val")


def test_validation_data_must_have_the_training_categories(tmp_path):
    train = dataset_from_spec("coco:{}:{}".format(*write_coco(tmp_path / "train.json", tmp_path / "t")), "train")
    same = "coco:{}:{}".format(*write_coco(tmp_path / "val.json", tmp_path / "v"))
    assert len(dataset_from_spec(same, "val", like=train)) == 2
    other = "coco:{}:{}".format(*write_coco(tmp_path / "other.json", tmp_path / "o",
                                            categories=[{"id": 3, "name": "barrel"}]))
    with pytest.raises(DatasetError, match="categories of .*other.json .* differ from those of .*train.json"):
        dataset_from_spec(other, "val", like=train)


def test_train_with_separate_json_training_and_validation_sets(tmp_path, capsys):
    train_json, train_images = write_coco(tmp_path / "train.json", tmp_path / "train_imgs", count=2, seed=1)
    val_json, val_images = write_coco(tmp_path / "val.json", tmp_path / "val_imgs", count=3, seed=2)
    out = tmp_path / "run"
    assert main(["train", "--data", f"coco:{train_json}:{train_images}", "--val-data", f"coco:{val_json}:{val_images}",
                 "--out", str(out), "--iterations", "1", "--log-period", "1", "--no-progress", "--threads", "2",
                 "num_classes=1", *SMALL]) == 0
    captured = capsys.readouterr()
    assert "| segm |" in captured.out and "warning" not in captured.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r["eval"] for r in records if "eval" in r]
    assert len(evaluations) == 1 and set(evaluations[0]["per_class"]["segm"]) == {"crate"}
    assert 0 <= evaluations[0]["segm"]["AP"] <= 100  # percent
    # Without --val-data a json spec validates on the training data, and says so.
    assert main(["train", "--data", f"coco:{train_json}:{train_images}", "--out", str(tmp_path / "run2"),
                 "--iterations", "1", "--no-progress", "--threads", "2", "--eval-limit", "1", "num_classes=1",
                 *SMALL]) == 0
    assert "validation metrics are measured on the training data" in capsys.readouterr().err
    # A missing validation image folder ends the command with the spec named.
    assert main(["train", "--data", f"coco:{train_json}:{train_images}", "--val-data",
                 f"coco:{val_json}:{tmp_path / 'gone'}", "--out", str(tmp_path / "run3"), "num_classes=1",
                 *SMALL]) == 2
    err = capsys.readouterr().err
    assert "image folder not found" in err and f"coco:{val_json}:{tmp_path / 'gone'}" in err
