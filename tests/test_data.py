"""Data: the synthetic shapes set, COCO/LVIS-format reading (polygons, RLE, crowd, empty images),
the augmentations (masks stay aligned with boxes), the samplers, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastdiffinst.data import (
    DatasetError,
    InferenceSampler,
    InstanceDataset,
    RepeatFactorTrainingSampler,
    TrainingSampler,
    dataset_from_spec,
    eval_transform,
    official_train_transform,
    repeat_factors,
    train_loader,
)
from fastdiffinst.data.synthetic import CLASSES, MIN_VISIBLE_PIXELS, render, shape_mask, write_split
from fastdiffinst.data.transforms import RandomCrop, RandomFlip, ResizeShortestEdge, shortest_edge_size


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("synthetic"), "val", 6)


def _mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]


# ------------------------------------------------------------------------------------------------
# Synthetic set


def test_synthetic_render_is_deterministic_and_masks_are_exact():
    image, instances = render(0, "val", 3)
    again, instances_again = render(0, "val", 3)
    assert np.array_equal(image, again) and len(instances) == len(instances_again) >= 1
    other, _ = render(1, "val", 3)
    assert image.shape != other.shape or not np.array_equal(image, other)
    assert image.dtype == np.uint8 and max(image.shape[:2]) <= 256
    union = np.zeros(image.shape[:2], dtype=int)
    for inst in instances:
        assert inst["mask"].sum() >= MIN_VISIBLE_PIXELS and 0 <= inst["category"] < len(CLASSES)
        union += inst["mask"]
    assert union.max() == 1, "visible masks must not overlap (occlusion removes covered pixels)"


def test_shape_rasters():
    circle = shape_mask("circle", 41, 41, 20.5, 20.5, 20.0, 0.0, 1.0)
    assert abs(int(circle.sum()) - math.pi * 100) < 12
    square = shape_mask("square", 40, 40, 20.0, 20.0, 20.0, 0.0, 1.0)
    assert int(square.sum()) == 18 * 18  # |x + 0.5 - 20| <= 8.5: pixels 11..28
    ring = shape_mask("ring", 41, 41, 20.5, 20.5, 20.0, 0.0, 1.0)
    assert not ring[20, 20] and ring[20, 11]
    for kind in CLASSES:
        assert shape_mask(kind, 64, 64, 32.0, 32.0, 30.0, 0.3, 0.6).any(), kind
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("blob", 8, 8, 4.0, 4.0, 4.0, 0.0, 1.0)


def test_synthetic_split_written_as_coco(synthetic):
    data = json.loads((synthetic / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASSES)
    assert len(data["images"]) == 6 and len(data["annotations"]) >= 6
    dataset = InstanceDataset(synthetic / "annotations.json", synthetic / "images")
    for index in range(len(dataset)):
        sample = dataset[index]
        image, instances = render(0, "val", index)
        assert torch.equal(sample["image"], torch.from_numpy(image).permute(2, 0, 1))
        assert sample["masks"].shape[0] == len(instances)
        for mask, box, label, inst in zip(sample["masks"], sample["boxes"], sample["labels"], instances):
            assert torch.equal(mask.bool(), torch.from_numpy(inst["mask"]))
            assert box.tolist() == _mask_box(mask) and int(label) == inst["category"]
    # Same seed, same files.
    again = write_split(synthetic.parent / "again", "val", 6)
    assert (again / "annotations.json").read_text() == (synthetic / "annotations.json").read_text()


# ------------------------------------------------------------------------------------------------
# COCO / LVIS format


# Two images (20×30 and 16×16) and two categories, for the tests here and in test_data_validation.py.
COCO_IMAGES = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
               {"id": 2, "file_name": "b.png", "height": 16, "width": 16}]
COCO_CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]


def coco_folder(tmp_path, annotations, images=None, categories=None):
    """``tmp_path/ann.json`` and a grey PNG per image under ``tmp_path/images``; the json's path."""
    from PIL import Image

    (tmp_path / "images").mkdir(exist_ok=True)
    images = images or COCO_IMAGES
    for entry in images:
        Image.fromarray(np.full((entry["height"], entry["width"], 3), 100, np.uint8)).save(
            tmp_path / "images" / entry["file_name"])
    categories = categories or COCO_CATEGORIES
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_coco_polygons_rle_crowd_and_empty_images(tmp_path):
    from pycocotools import mask as mask_utils

    square = np.zeros((20, 30), np.uint8)
    square[5:9, 10:20] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    rle["counts"] = rle["counts"].decode()
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 6, 6], "iscrowd": 0,
         "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [10, 5, 10, 4], "iscrowd": 0, "segmentation": rle},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 20], "iscrowd": 1, "segmentation": rle},
    ]
    dataset = InstanceDataset(coco_folder(tmp_path, annotations), tmp_path / "images")
    assert dataset.class_names == ["cat", "dog"]  # contiguous labels in category-id order
    sample = dataset[0]
    assert sample["labels"].tolist() == [1, 0] and sample["masks"].shape == (2, 20, 30)
    assert torch.equal(sample["masks"][1], torch.from_numpy(square))
    assert sample["masks"][0].sum() > 20 and sample["boxes"][1].tolist() == [10.0, 5.0, 20.0, 9.0]
    empty = dataset[1]  # no annotations: kept, with empty targets
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 16, 16)
    assert dataset.class_image_counts().tolist() == [1.0, 1.0]


def test_lvis_format(tmp_path):
    from PIL import Image

    (tmp_path / "val2017").mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "val2017" / "000000000001.jpg")
    data = {"images": [{"id": 1, "height": 12, "width": 12, "coco_url": "http://x/val2017/000000000001.jpg",
                        "neg_category_ids": [], "not_exhaustive_category_ids": []}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 1, 5, 5],
                             "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]], "area": 25}],
            "categories": [{"id": 1, "name": "a", "image_count": 30, "frequency": "f"},
                           {"id": 2, "name": "b", "image_count": 4, "frequency": "r"}]}
    (tmp_path / "lvis_v1_val.json").write_text(json.dumps(data))
    dataset = dataset_from_spec(f"lvis:{tmp_path}", "val")
    assert dataset[0]["labels"].tolist() == [1]
    assert dataset.class_image_counts().tolist() == [30.0, 4.0]


def test_malformed_annotation_files_name_the_entry(tmp_path):
    good = {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 6, 6], "segmentation": [[2, 2, 8, 2, 8, 8]]}
    cases = [({**good, "category_id": 99}, "annotation 1 of image 1 \\(annotations\\[0\\]\\): has category_id 99"),
             ({**good, "image_id": 5}, "image_id 5"),
             ({**good, "bbox": [1, 2]}, "'bbox' must be"),
             ({**good, "segmentation": [[1, 2]]}, "segmentation\\[0\\] must be a polygon")]
    for annotation, message in cases:
        path = coco_folder(tmp_path, [annotation])
        with pytest.raises(DatasetError, match=message) as error:
            InstanceDataset(path, tmp_path / "images")
        assert str(path) in str(error.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid json"):
        InstanceDataset(tmp_path / "broken.json", tmp_path / "images")
    with pytest.raises(DatasetError, match="annotation file not found"):
        InstanceDataset(tmp_path / "missing.json", tmp_path / "images")
    with pytest.raises(DatasetError, match="image folder not found"):
        InstanceDataset(path, tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="dataset folder not found"):
        dataset_from_spec(f"coco:{tmp_path / 'nowhere'}", "val")
    with pytest.raises(DatasetError, match="--data must be"):
        dataset_from_spec("imagenet", "val")


def test_unreadable_images(tmp_path):
    dataset = InstanceDataset(coco_folder(tmp_path, []), tmp_path / "images")
    (tmp_path / "images" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image"):
        dataset[1]
    (tmp_path / "images" / "a.png").unlink()
    with pytest.raises(DatasetError, match="image not found"):
        dataset[0]


# ------------------------------------------------------------------------------------------------
# Augmentations


def _random_sample(generator: torch.Generator) -> dict:
    h, w = (int(v) for v in torch.randint(40, 120, (2,), generator=generator))
    count = int(torch.randint(0, 6, (1,), generator=generator))
    masks = torch.zeros(count, h, w, dtype=torch.uint8)
    for i in range(count):
        y = int(torch.randint(0, h - 4, (1,), generator=generator))
        x = int(torch.randint(0, w - 4, (1,), generator=generator))
        masks[i, y:y + int(torch.randint(3, h - y + 1, (1,), generator=generator)),
              x:x + int(torch.randint(3, w - x + 1, (1,), generator=generator))] = 1
    boxes = torch.tensor([_mask_box(m) for m in masks], dtype=torch.float32).reshape(count, 4)
    return {"image": torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8), "boxes": boxes,
            "labels": torch.arange(count), "masks": masks, "height": h, "width": w, "image_id": 1}


@pytest.mark.parametrize("seed", range(30))
def test_masks_stay_aligned_with_boxes_after_every_augmentation(seed):
    g = torch.Generator().manual_seed(seed)
    sample = _random_sample(g)
    transforms = {"flip": RandomFlip(1.0, g), "resize": ResizeShortestEdge([50, 70, 97], 150, g),
                  "crop": RandomCrop(20, 60, g),
                  "official": official_train_transform((48, 64, 80), 133, (40, 50, 60), (38, 60), g)}
    for name, transform in transforms.items():
        out = transform(dict(sample))
        h, w = out["image"].shape[1:]
        assert out["masks"].shape[1:] == (h, w)
        assert out["masks"].shape[0] == out["boxes"].shape[0] == out["labels"].shape[0]
        assert (out["height"], out["width"]) == (sample["height"], sample["width"])
        for mask, box in zip(out["masks"], out["boxes"]):
            assert mask.any(), name
            tight = torch.tensor(_mask_box(mask))
            # Boxes follow their masks within the pixel a resize or nearest sampling can move an edge.
            tolerance = 1e-6 if name in ("flip", "crop") else 1.0 + max(w, h) / min(sample["width"], sample["height"])
            assert torch.allclose(box, tight, atol=tolerance), (name, box.tolist(), tight.tolist())


def test_flip_and_crop_exactly():
    g = torch.Generator().manual_seed(0)
    sample = _random_sample(g)
    flipped = RandomFlip(1.0)(sample)
    assert torch.equal(flipped["image"], sample["image"].flip(-1))
    assert torch.equal(RandomFlip(1.0)(flipped)["boxes"], sample["boxes"])
    assert RandomFlip(0.0)(sample) is sample
    crop = RandomCrop(10_000, 10_000)(sample)  # larger than the image: the whole image
    assert torch.equal(crop["image"], sample["image"])


def test_resize_sizes_follow_detectron2():
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_size(400, 2000, 800, 1333) == (267, 1333)
    out = eval_transform(32, 100)(_random_sample(torch.Generator().manual_seed(1)))
    assert min(out["image"].shape[1:]) == 32 or max(out["image"].shape[1:]) == 100


# ------------------------------------------------------------------------------------------------
# Samplers and loaders


def test_training_sampler_partitions_one_stream_over_ranks():
    import itertools

    streams = [list(itertools.islice(iter(TrainingSampler(7, seed=3, rank=r, world_size=2)), 14)) for r in (0, 1)]
    single = list(itertools.islice(iter(TrainingSampler(7, seed=3, rank=0, world_size=1)), 28))
    assert streams[0] == single[0::2] and streams[1] == single[1::2]
    assert sorted(single[:7]) == list(range(7)) and sorted(single[7:14]) == list(range(7))


def test_repeat_factors_and_their_sampler():
    labels = [{0}] * 999 + [{1}]  # class 1 in 1 of 1000 images: f = 0.001 -> r = 1; use t = 0.01
    factors = repeat_factors(labels, threshold=0.01)
    assert torch.allclose(factors[:999], torch.ones(999)) and abs(float(factors[-1]) - math.sqrt(10)) < 1e-6
    assert float(repeat_factors([set(), {2}], 0.001)[0]) == 1.0
    import itertools

    sampler = RepeatFactorTrainingSampler(torch.tensor([1.0, 2.5]), seed=0, rank=0, world_size=1)
    draws = list(itertools.islice(iter(sampler), 3500))
    ones = draws.count(1)
    assert 2300 < ones < 2700  # 2.5 / 3.5 of the stream


def test_inference_sampler_shards_and_the_training_stream(synthetic):
    shards = [list(InferenceSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    dataset = InstanceDataset(synthetic / "annotations.json", synthetic / "images")

    def augment(generator):
        return official_train_transform((48, 64), 100, (40, 50), (32, 48), generator)

    def batches(start, workers):
        loader = iter(train_loader(dataset, 2, augment, seed=0, start=start, num_workers=workers))
        return [next(loader) for _ in range(3)]

    first = batches(0, 0)
    assert isinstance(first[0], list) and len(first[0]) == 2 and first[0][0]["image"].dtype == torch.uint8
    # The same samples with the same augmentation from a worker, and from a resumed position.
    for a, b in zip(first, batches(0, 1)):
        assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["masks"], y["masks"]) for x, y in zip(a, b))
    resumed = batches(2, 0)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(first[1], resumed[0]))

