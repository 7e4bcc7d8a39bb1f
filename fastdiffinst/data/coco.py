"""COCO- and LVIS-format instance segmentation data through pycocotools.

:class:`InstanceDataset` reads a COCO-format json (``images``, ``annotations`` with polygon or RLE
``segmentation``, ``categories``) and an image folder. Category ids map to contiguous labels
``0..K-1`` in id order; crowd annotations are skipped; images without annotations are kept.
Each sample is ``{"image": uint8 [3, H, W] RGB, "boxes": [G, 4] fp32 xyxy, "labels": [G] int64,
"masks": [G, H, W] uint8, "image_id": int, "height": H, "width": W}``; an optional ``transform``
(``fastdiffinst.data.transforms``) is applied to it.

LVIS v1 json is the same format with ``image_count``/``frequency`` per category, no ``iscrowd``,
and images named by their ``coco_url`` (``train2017/000000xxxxxx.jpg`` relative to the COCO root):
:meth:`InstanceDataset.lvis` reads it, and :meth:`class_image_counts` feeds the federated loss.

A missing file, a malformed annotation file (the file and the offending entry are named) or an
image that cannot be read raises :class:`DatasetError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fastdiffinst.common.boxes import clip_boxes, nonempty_instances


class DatasetError(ValueError):
    """Bad dataset files or entries."""


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} is not valid json: {error}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a json object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: '{key}' must be a list")
    return data


def _check_entries(path: Path, data: dict) -> None:
    """Every entry a decoder needs, with the file and the entry named on failure."""
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not all(isinstance(image.get(k), int) for k in ("id", "height", "width")):
            raise DatasetError(f"{path}: images[{i}] needs integer 'id', 'height' and 'width', got {image!r:.200}")
        if not isinstance(image.get("file_name", image.get("coco_url")), str):
            raise DatasetError(f"{path}: images[{i}] (id {image['id']}) has no 'file_name' or 'coco_url'")
    category_ids = set()
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            raise DatasetError(f"{path}: categories[{i}] needs an integer 'id', got {category!r:.200}")
        category_ids.add(category["id"])
    image_ids = {image["id"] for image in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        if not isinstance(ann, dict):
            raise DatasetError(f"{where} is not an object")
        if ann.get("image_id") not in image_ids:
            raise DatasetError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise DatasetError(f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetError(f"{where}: 'bbox' must be [x, y, w, h], got {bbox!r:.100}")
        segmentation = ann.get("segmentation")
        polygons_ok = isinstance(segmentation, list) and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation)
        rle_ok = isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation
        if not (polygons_ok or rle_ok):
            raise DatasetError(f"{where}: 'segmentation' must be polygons (lists of >= 3 x, y pairs) or an RLE "
                               f"with 'counts' and 'size', got {str(segmentation)[:100]}")


def annotation_to_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """``uint8 [height, width]`` mask of a polygon or RLE (compressed or not) segmentation."""
    from pycocotools import mask as mask_utils

    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def read_image(path: Path) -> Tensor:
    """``uint8 [3, H, W]`` RGB; :class:`DatasetError` when the file is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class InstanceDataset(Dataset):
    """COCO-format instances (see the module docstring).

    Args:
        annotation_file: the json file.
        image_root: the folder image ``file_name``s are relative to.
        transform: ``sample -> sample`` (augmentation / test resize).
        file_name: ``image entry -> relative path`` (LVIS: from ``coco_url``).
    """

    def __init__(self, annotation_file: str | os.PathLike, image_root: str | os.PathLike,
                 transform: Callable[[dict], dict] | None = None,
                 file_name: Callable[[dict], str] | None = None) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise DatasetError(f"image folder not found: {self.image_root}")
        data = _load_json(self.annotation_file)
        _check_entries(self.annotation_file, data)
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_to_label = {c["id"]: i for i, c in enumerate(self.categories)}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.annotations: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                self.annotations[ann["image_id"]].append(ann)
        self.transform = transform
        self._file_name = file_name or (lambda image: image["file_name"])
        self.info = data.get("info", {})

    @classmethod
    def lvis(cls, annotation_file: str | os.PathLike, coco_root: str | os.PathLike,
             transform: Callable[[dict], dict] | None = None) -> InstanceDataset:
        """LVIS v1: images are found under ``coco_root`` from their ``coco_url`` (``split/name``)."""
        def file_name(image: dict) -> str:
            if "file_name" in image:
                return image["file_name"]
            return "/".join(image["coco_url"].split("/")[-2:])

        return cls(annotation_file, coco_root, transform, file_name)

    @property
    def class_names(self) -> list[str]:
        return [c.get("name", str(c["id"])) for c in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def class_image_counts(self) -> Tensor:
        """``[K]`` number of training images containing each class: LVIS's ``image_count``, else
        counted from the annotations."""
        if all("image_count" in c for c in self.categories):
            return torch.tensor([float(c["image_count"]) for c in self.categories])
        counts = torch.zeros(self.num_classes)
        for anns in self.annotations.values():
            for label in {self.category_to_label[a["category_id"]] for a in anns}:
                counts[label] += 1
        return counts

    def image_labels(self, index: int) -> set[int]:
        """The labels present in image ``index`` (for repeat-factor sampling), without decoding it."""
        return {self.category_to_label[a["category_id"]] for a in self.annotations[self.images[index]["id"]]}

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> Tensor:
        """Image ``index`` as ``uint8 [3, H, W]``, checked against its annotated size."""
        entry = self.images[index]
        path = self.image_root / self._file_name(entry)
        image = read_image(path)
        if tuple(image.shape[1:]) != (entry["height"], entry["width"]):
            raise DatasetError(f"{path} is {image.shape[1]}×{image.shape[2]}, but {self.annotation_file} says "
                               f"{entry['height']}×{entry['width']} (image id {entry['id']})")
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.images[index]
        image = self.load_image(index)
        height, width = int(image.shape[1]), int(image.shape[2])
        boxes, labels, masks = [], [], []
        for ann in self.annotations[entry["id"]]:
            x, y, w, h = ann["bbox"]
            if x + w <= 0 or y + h <= 0 or x >= width or y >= height:
                raise DatasetError(f"{self.annotation_file}: annotation {ann.get('id')} of image {entry['id']} lies "
                                   f"outside its {width}×{height} image (bbox {ann['bbox']})")
            boxes.append([x, y, x + w, y + h])
            labels.append(self.category_to_label[ann["category_id"]])
            masks.append(annotation_to_mask(ann, height, width))
        boxes = clip_boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), height, width)
        masks = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
        keep = nonempty_instances(boxes, masks)  # detectron2's filter_empty_instances
        sample = {
            "image": image, "boxes": boxes[keep], "labels": torch.tensor(labels, dtype=torch.int64)[keep],
            "masks": masks[keep], "image_id": entry["id"], "height": height, "width": width,
        }
        return self.transform(sample) if self.transform is not None else sample
