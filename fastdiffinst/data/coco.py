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

Every entry of the json is checked when it is read, before pycocotools sees any of it: pycocotools
trusts its input and sizes its buffers from polygon coordinates, so one of ``1e9`` or ``null`` can
make it allocate gigabytes or crash. Numbers are json numbers (``true``/``false`` are not), finite
(Python's json reads ``NaN`` and ``Infinity``), and ids are integers:

* the file holds an object with lists ``images`` (at least one), ``annotations`` and ``categories``;
* images: a unique ``id``, ``height`` and ``width`` in [1, ``MAX_IMAGE_SIDE``], a ``file_name`` or
  ``coco_url``;
* categories (at least one): a unique ``id`` (and LVIS's ``image_count``, if present, >= 0);
* annotations, crowd ones too (COCOeval reads them): a unique ``id``, the ``image_id`` and
  ``category_id`` of a listed image and category, ``iscrowd`` 0 or 1 if present, ``bbox``
  ``[x, y, w, h]`` with ``w, h >= 0``, and a ``segmentation`` that is either polygons — a non-empty
  list of lists of >= 3 x, y pairs, each coordinate at most one image width (x) or height (y)
  outside the image (``POLYGON_MARGIN``: real polygons stray a pixel or two, and pycocotools'
  buffers grow with the polygon's extent) — or an RLE whose ``size`` is its image's ``[height,
  width]`` and whose ``counts``, a list (uncompressed) or COCO's compressed string
  (:func:`decode_rle_string`), are non-negative runs summing to ``height * width``.

Boxes: a bbox with a non-finite value or a negative width or height makes the file malformed; a
zero-width or zero-height bbox (degenerate, but found in real COCO-style data) is skipped, with one
warning per data set giving the count and the file; an instance whose box or mask is empty after
clipping or augmentation is dropped silently (detectron2's ``filter_empty_instances``).

A missing file, a malformed annotation file (the file, the image and annotation ids and the index
of the offending entry, and what was expected and found are named) or an image that cannot be
read raises :class:`DatasetError`.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from itertools import accumulate, chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fastdiffinst.common.boxes import clip_boxes, nonempty_instances


class DatasetError(ValueError):
    """Bad dataset files or entries."""


# How far outside its image a polygon coordinate may lie, in image widths (x) or heights (y).
POLYGON_MARGIN = 1.0
# The longest polygon outline accepted, in multiples of its image's height + width: a real outline
# goes round an object a few times at most (a convex one: at most twice), while pycocotools'
# buffers grow with the outline.
MAX_PERIMETER = 100
# The largest image side accepted: pycocotools rasterises every mask at its image's declared size
# (COCOeval too), so an absurd size in the json would allocate as absurd a buffer.
MAX_IMAGE_SIDE = 1 << 16
# Polygon coordinates are checked this many polygons at a time, bounding the temporary arrays.
_POLYGON_BATCH = 1 << 16
_NUMBER = frozenset({int, float})
_INTEGER = frozenset({int})
_LIST = frozenset({list})


def _show(value: object, limit: int = 100) -> str:
    """``repr(value)``, shortened to ``limit`` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value: object) -> bool:
    """A json integer: Python's ``bool`` is an ``int``, json's ``true`` is not a number."""
    return type(value) is int


def _first_not_of(values: list, types: frozenset[type]) -> int | None:
    """Index of the first item of ``values`` whose exact type is not in ``types``, or None."""
    if set(map(type, values)) <= types:  # the common case, in one pass at C speed
        return None
    return next(i for i, value in enumerate(values) if type(value) not in types)


def _as_floats(numbers: list) -> np.ndarray:
    """float64 array of json numbers; integers beyond float64's range become ±inf."""
    try:
        return np.array(numbers, dtype=np.float64)
    except OverflowError:  # json reads 1e400 as inf but 10**400 written out as an int
        return np.array(
            [v if abs(v) <= sys.float_info.max else math.inf if v > 0 else -math.inf for v in numbers], np.float64
        )


# pycocotools shifts each 5-bit group of a run into a 32-bit int: a run's 7th character would
# overflow it, so pycocotools reads runs of at most 6 characters (30 bits) correctly.
MAX_RLE_RUN_CHARACTERS = 6


def decode_rle_string(counts: str | bytes) -> list[int]:
    """The run lengths of a COCO compressed RLE ``counts`` string; ValueError where it is not one.

    Each run is written as 5-bit groups, least significant first, one character per group: ``48 +
    group``, plus 0x20 while more groups of the run follow. In a run's last character 0x10 is the
    sign bit. From the fourth run on, the value written is the difference to the run two before.
    """
    try:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except UnicodeEncodeError:
        raise ValueError("it has non-ASCII characters") from None
    if not raw:
        return []
    codes = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    outside = np.flatnonzero((codes < 0) | (codes > 63))
    if outside.size:
        raise ValueError(f"character {chr(raw[outside[0]])!r} at {outside[0]} is not one of '0'..'o'")
    ends = np.flatnonzero((codes & 0x20) == 0)  # a character without the continuation bit ends a run
    if ends.size == 0 or ends[-1] != codes.size - 1:
        raise ValueError("it ends in the middle of a run")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > MAX_RLE_RUN_CHARACTERS:
        raise ValueError(f"a run at character {starts[lengths.argmax()]} has more than {MAX_RLE_RUN_CHARACTERS} "
                         f"characters (pycocotools reads no more)")
    shifts = 5 * (np.arange(codes.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((codes & 0x1F) << shifts, starts)
    values -= np.where(codes[ends] & 0x10, 1 << (5 * lengths), 0)  # sign extension
    runs = values.tolist()
    # Python ints from here: the running sums of a hostile string must not overflow.
    runs[1::2] = list(accumulate(runs[1::2]))
    runs[2::2] = list(accumulate(runs[2::2]))
    return runs


def _load_json(path: Path) -> dict:
    """The json object of ``path`` with its lists ``images``, ``annotations`` and ``categories``."""
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise DatasetError(f"{path} is not valid json: {_show(error, 200)}") from None
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a json object with 'images', 'annotations' and 'categories', "
            f"got {type(data).__name__} {_show(data)}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            found = "nothing" if key not in data else f"{type(data[key]).__name__} {_show(data[key])}"
            raise DatasetError(f"{path}: '{key}' must be a list, got {found}")
    return data


class _Invalid(Exception):
    """What is wrong with one entry; the caller names the entry in the :class:`DatasetError` it raises."""


def _check_image(image: dict, sizes: dict[int, tuple[int, int]]) -> None:
    """An image entry: an integer ``id`` not in ``sizes``, positive integer ``height`` and ``width``,
    a ``file_name`` or ``coco_url`` string."""
    if not _is_int(image.get("id")):
        raise _Invalid(f"needs an integer 'id', got {_show(image.get('id'), 50)}")
    if image["id"] in sizes:
        raise _Invalid("has the id of an earlier image")
    for key in ("height", "width"):
        if not (_is_int(image.get(key)) and 0 < image[key] <= MAX_IMAGE_SIDE):
            raise _Invalid(f"'{key}' must be an integer in [1, {MAX_IMAGE_SIDE}], got {_show(image.get(key), 50)}")
    if not isinstance(image.get("file_name", image.get("coco_url")), str):
        raise _Invalid("needs a 'file_name' or 'coco_url' string")


def _check_images(path: Path, images: list) -> dict[int, tuple[int, int]]:
    """``{id: (height, width)}`` of at least one image entry as :func:`_check_image` wants."""
    if not images:
        raise DatasetError(f"no images in {path}")
    sizes: dict[int, tuple[int, int]] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            raise DatasetError(f"{path}: images[{i}] must be an object, got {_show(image)}")
        try:
            _check_image(image, sizes)
        except _Invalid as problem:
            raise DatasetError(f"{path}: image {_show(image.get('id'), 50)} (images[{i}]): {problem}") from None
        sizes[image["id"]] = (image["height"], image["width"])
    return sizes


def _check_categories(path: Path, categories: list) -> set[int]:
    """The ids of category entries (at least one) with a unique integer ``id`` (and ``image_count``
    >= 0 if present)."""
    if not categories:
        raise DatasetError(f"no categories in {path}")
    ids: set[int] = set()
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            raise DatasetError(f"{path}: categories[{i}] needs an integer 'id', got {_show(category)}")
        where = f"{path}: category {category['id']} (categories[{i}])"
        if category["id"] in ids:
            raise DatasetError(f"{where}: has the id of an earlier category")
        if "image_count" in category and not (_is_int(category["image_count"]) and category["image_count"] >= 0):
            raise DatasetError(f"{where}: 'image_count' must be an integer >= 0, got {_show(category['image_count'])}")
        if "name" in category and not isinstance(category["name"], str):
            raise DatasetError(f"{where}: 'name' must be a string, got {_show(category['name'])}")
        ids.add(category["id"])
    return ids


def _annotation_error(path: Path, index: int, ann: dict, problem: object) -> DatasetError:
    """``problem`` with annotation ``index`` of ``path`` named by its id, its image's id and its index."""
    return DatasetError(
        f"{path}: annotation {_show(ann.get('id'), 50)} of image {_show(ann.get('image_id'), 50)} "
        f"(annotations[{index}]): {problem}"
    )


def _check_runs(runs: list[int], height: int, width: int) -> None:
    """RLE run lengths: non-negative, summing to ``height * width``."""
    negative = next((j for j, run in enumerate(runs) if run < 0), None)
    if negative is not None:
        raise _Invalid(f"RLE counts must be >= 0, got {runs[negative]} at counts[{negative}]")
    if sum(runs) != height * width:
        raise _Invalid(
            f"RLE counts must sum to height × width = {height} × {width} = {height * width}, "
            f"got {len(runs)} runs summing to {sum(runs)}"
        )


def _check_rle(rle: dict, height: int, width: int) -> None:
    """An RLE of an image ``height × width``: ``size`` ``[height, width]`` and ``counts`` a list of
    integers or a compressed string (:func:`decode_rle_string`) of runs as :func:`_check_runs` wants."""
    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(map(_is_int, size)) and size == [height, width]):
        raise _Invalid(f"RLE 'size' must be its image's [height, width] = [{height}, {width}], got {_show(size, 50)}")
    counts = rle.get("counts")
    if isinstance(counts, list):
        bad = _first_not_of(counts, _INTEGER)
        if bad is not None:
            raise _Invalid(f"RLE counts must be integers, got {_show(counts[bad], 50)} at counts[{bad}]")
        runs = counts
    elif isinstance(counts, (str, bytes)):
        try:
            runs = decode_rle_string(counts)
        except ValueError as error:
            raise _Invalid(f"RLE counts is not a compressed RLE string: {error}") from None
    else:
        raise _Invalid(f"RLE counts must be a list of integers or a compressed string, got {_show(counts, 50)}")
    _check_runs(runs, height, width)


def _check_annotation(ann: dict, seen: set[int], sizes: dict[int, tuple[int, int]], category_ids: set[int]) -> None:
    """One annotation: an integer ``id`` not in ``seen``, a listed ``image_id`` and ``category_id``,
    ``iscrowd`` 0 or 1 if present, a ``bbox`` list of 4 values, and a ``segmentation`` that is an
    RLE as :func:`_check_rle` wants or a non-empty list (the values of all boxes and polygons are
    checked together by :func:`_check_bboxes` and :func:`_check_polygons`)."""
    if not _is_int(ann.get("id")):
        raise _Invalid(f"needs an integer 'id', got {_show(ann.get('id'), 50)}")
    if ann["id"] in seen:
        raise _Invalid("has the id of an earlier annotation")
    if not (_is_int(ann.get("image_id")) and ann["image_id"] in sizes):
        raise _Invalid(f"has image_id {_show(ann.get('image_id'), 50)}, which is not an image id in 'images'")
    if not (_is_int(ann.get("category_id")) and ann["category_id"] in category_ids):
        raise _Invalid(
            f"has category_id {_show(ann.get('category_id'), 50)}, which is not a category id in 'categories'"
        )
    if "iscrowd" in ann and not (_is_int(ann["iscrowd"]) and ann["iscrowd"] in (0, 1)):
        raise _Invalid(f"'iscrowd' must be 0 or 1, got {_show(ann['iscrowd'], 50)}")
    area = ann.get("area", 0)
    if type(area) not in _NUMBER or not (math.isfinite(area) and area >= 0):
        raise _Invalid(f"'area' must be a finite number >= 0, got {_show(area, 50)}")
    if not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4):
        raise _Invalid(f"'bbox' must be [x, y, w, h], got {_show(ann.get('bbox'))}")
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        _check_rle(segmentation, *sizes[ann["image_id"]])
    elif segmentation == []:
        raise _Invalid("'segmentation' is an empty list of polygons")
    elif not isinstance(segmentation, list):
        raise _Invalid(
            f"'segmentation' must be polygons (a list of lists of x, y pairs) or an RLE (an object with 'size' and "
            f"'counts'), got {_show(segmentation)}"
        )


def _check_polygons(
    path: Path, annotations: list, polygons: list, owners: list[int], sizes: dict[int, tuple[int, int]]
) -> None:
    """``polygons`` (of the annotations ``owners``): lists of an even number >= 6 of finite numbers,
    x within ``POLYGON_MARGIN`` image widths and y within as many image heights of the image."""
    for start in range(0, len(polygons), _POLYGON_BATCH):
        batch = polygons[start : start + _POLYGON_BATCH]
        try:
            _check_polygon_batch(batch, owners[start : start + len(batch)], annotations, sizes)
        except _Invalid as problem:
            k, message = problem.args
            owner = owners[start + k]
            polygon = start + k - bisect.bisect_left(owners, owner)  # owners ascend: the owner's polygons are a run
            raise _annotation_error(path, owner, annotations[owner], f"segmentation[{polygon}]{message}") from None


def _check_polygon_batch(batch: list, owners: list[int], annotations: list, sizes: dict) -> None:
    """:func:`_check_polygons` for one batch; raises ``_Invalid(index in batch, problem)``."""
    bad = _first_not_of(batch, _LIST)
    if bad is None:
        lengths = np.fromiter(map(len, batch), np.int64, len(batch))
        wrong = (lengths < 6) | (lengths % 2 == 1)
        if not wrong.any():
            _check_coordinates(batch, lengths, owners, annotations, sizes)
            return
        bad = int(np.argmax(wrong))
    raise _Invalid(bad, f" must be a polygon, a list of >= 3 x, y pairs (an even count >= 6), got {_show(batch[bad])}")


def _check_coordinates(batch: list, lengths: np.ndarray, owners: list[int], annotations: list, sizes: dict) -> None:
    """The coordinates of the polygons ``batch`` (of ``lengths``): see :func:`_check_polygons`."""
    flat = list(chain.from_iterable(batch))
    bad = _first_not_of(flat, _NUMBER)
    if bad is None:
        values = _as_floats(flat)
        # Polygon lengths are even, so even positions of the flat list are x and odd ones y.
        height_width = np.array([sizes[annotations[a]["image_id"]] for a in owners], np.float64)
        extent = np.repeat(height_width[:, ::-1], lengths // 2, axis=0).ravel()
        inside = (values >= -POLYGON_MARGIN * extent) & (values <= (1 + POLYGON_MARGIN) * extent)
        if inside.all():
            _check_perimeters(values, lengths, height_width)
            return
        bad = int(np.argmin(inside))
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, bad, side="right"))
    coordinate = bad - int(ends[k] - lengths[k])
    height, width = sizes[annotations[owners[k]]["image_id"]]
    axis, size, unit = ("x", width, "width") if coordinate % 2 == 0 else ("y", height, "height")
    raise _Invalid(
        k,
        f"[{coordinate}] ({axis}) must be a number within [{-POLYGON_MARGIN * size:g}, "
        f"{(1 + POLYGON_MARGIN) * size:g}] (at most {POLYGON_MARGIN:g} image {unit} outside the {width}×{height} "
        f"image), got {_show(flat[bad], 50)}",
    )


def _check_perimeters(values: np.ndarray, lengths: np.ndarray, height_width: np.ndarray) -> None:
    """Each polygon's outline, measured as pycocotools walks it (the larger of |dx| and |dy| per
    edge, the closing edge included), at most ``MAX_PERIMETER`` times its image's height + width:
    pycocotools' buffers grow with it, and a zig-zag of many vertices across the image would
    otherwise take gigabytes."""
    xs, ys = values[0::2], values[1::2]
    starts = np.concatenate(([0], np.cumsum(lengths // 2)[:-1]))
    following = np.arange(1, xs.size + 1)
    following[np.cumsum(lengths // 2) - 1] = starts  # each polygon's last vertex closes on its first
    steps = np.maximum(np.abs(xs[following] - xs), np.abs(ys[following] - ys))
    perimeters = np.add.reduceat(steps, starts)
    limits = MAX_PERIMETER * height_width.sum(axis=1)
    too_long = np.flatnonzero(perimeters > limits)
    if too_long.size:
        k = int(too_long[0])
        raise _Invalid(k, f" has an outline of {perimeters[k]:.0f} pixels, more than {MAX_PERIMETER} times its "
                          f"image's height + width ({limits[k]:.0f})")


def _check_bboxes(path: Path, annotations: list, sizes: dict[int, tuple[int, int]]) -> np.ndarray:
    """``[N]`` bool, True where an annotation's ``bbox`` (a list of 4 already) has a zero width or
    height; the values must be finite numbers, width and height >= 0, and a box of positive area
    must overlap its image."""
    flat = list(chain.from_iterable(ann["bbox"] for ann in annotations))
    bad = _first_not_of(flat, _NUMBER)
    if bad is None:
        boxes = _as_floats(flat).reshape(-1, 4)
        wrong = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2:] < 0).any(axis=1)
        if not wrong.any():
            degenerate = (boxes[:, 2:] == 0).any(axis=1)
            _check_overlaps(path, annotations, boxes, ~degenerate, sizes)
            return degenerate
        bad = 4 * int(np.argmax(wrong))
    i = bad // 4
    raise _annotation_error(
        path,
        i,
        annotations[i],
        f"'bbox' must be [x, y, w, h] of finite numbers with w, h >= 0, got {_show(annotations[i]['bbox'])}",
    )


def _check_overlaps(path: Path, annotations: list, boxes: np.ndarray, checked: np.ndarray,
                    sizes: dict[int, tuple[int, int]]) -> None:
    """The ``checked`` boxes ``[N, 4]`` (xywh) overlap their images."""
    height_width = np.array([sizes[ann["image_id"]] for ann in annotations], np.float64).reshape(-1, 2)
    x, y, w, h = boxes.T
    outside = checked & ((x + w <= 0) | (y + h <= 0) | (x >= height_width[:, 1]) | (y >= height_width[:, 0]))
    if outside.any():
        i = int(np.argmax(outside))
        height, width = sizes[annotations[i]["image_id"]]
        raise _annotation_error(path, i, annotations[i], f"'bbox' {_show(annotations[i]['bbox'])} lies outside its "
                                                          f"{width}×{height} image")


def _check_entries(path: Path, data: dict) -> np.ndarray:
    """Check every entry of ``data`` read from ``path`` (see the module docstring); ``[N]`` bool, True
    where an annotation's bbox has zero area. Each entry is checked on its own in one pass, then the
    values of all boxes and polygons together, with numpy."""
    sizes = _check_images(path, data["images"])
    category_ids = _check_categories(path, data["categories"])
    annotations = data["annotations"]
    seen: set[int] = set()
    polygons: list = []
    owners: list[int] = []  # the annotation index of each polygon
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotations[{i}] must be an object, got {_show(ann)}")
        try:
            _check_annotation(ann, seen, sizes, category_ids)
        except _Invalid as problem:
            raise _annotation_error(path, i, ann, problem) from None
        seen.add(ann["id"])
        if isinstance(ann["segmentation"], list):
            polygons.extend(ann["segmentation"])
            owners.extend([i] * len(ann["segmentation"]))
    _check_polygons(path, annotations, polygons, owners, sizes)
    return _check_bboxes(path, annotations, sizes)


def category_name(category: dict) -> str:
    """A category's ``name``, or its id where it has none."""
    return category.get("name", str(category["id"]))


def evaluation_ground_truth(path: str | os.PathLike) -> dict:
    """The json of a checked data set (:class:`InstanceDataset`) with what COCOeval needs but the
    format leaves optional filled in: ``iscrowd`` 0, and ``area`` the bbox's ``w * h`` where absent."""
    data = _load_json(Path(path))
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    return data


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


def _zero_area_message(path: Path, ids: list[int], shown: int = 10) -> str:
    """The one warning about the annotations ``ids`` of ``path`` skipped for a zero-area bbox."""
    listed = ", ".join(map(str, ids[:shown])) + (", ..." if len(ids) > shown else "")
    noun = "annotation has" if len(ids) == 1 else "annotations have"
    return f"{len(ids)} {noun} a zero-area bbox in {path} and {'is' if len(ids) == 1 else 'are'} skipped (ids {listed})"


def read_image(path: Path) -> Tensor:
    """``uint8 [3, H, W]`` RGB; :class:`DatasetError` when the file is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
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

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_root: str | os.PathLike,
        transform: Callable[[dict], dict] | None = None,
        file_name: Callable[[dict], str] | None = None,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise DatasetError(f"image folder not found: {self.image_root}")
        data = _load_json(self.annotation_file)
        zero_area = _check_entries(self.annotation_file, data)
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_to_label = {c["id"]: i for i, c in enumerate(self.categories)}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.annotations: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        skipped = []  # non-crowd annotations with a zero-area bbox: degenerate, reported once below
        for ann, degenerate in zip(data["annotations"], zero_area.tolist()):
            if ann.get("iscrowd", 0):
                continue  # crowd regions are no training targets (COCOeval reads them from the file)
            if degenerate:
                skipped.append(ann["id"])
            else:
                self.annotations[ann["image_id"]].append(ann)
        if skipped:
            warnings.warn(_zero_area_message(self.annotation_file, skipped), stacklevel=2)
        self.transform = transform
        self._file_name = file_name or (lambda image: image["file_name"])
        self.info = data.get("info", {})

    @classmethod
    def lvis(
        cls,
        annotation_file: str | os.PathLike,
        coco_root: str | os.PathLike,
        transform: Callable[[dict], dict] | None = None,
    ) -> InstanceDataset:
        """LVIS v1: images are found under ``coco_root`` from their ``coco_url`` (``split/name``)."""

        def file_name(image: dict) -> str:
            if "file_name" in image:
                return image["file_name"]
            return "/".join(image["coco_url"].split("/")[-2:])

        return cls(annotation_file, coco_root, transform, file_name)

    @property
    def class_names(self) -> list[str]:
        return [category_name(c) for c in self.categories]

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
            raise DatasetError(
                f"{path} is {image.shape[1]}×{image.shape[2]}, but {self.annotation_file} says "
                f"{entry['height']}×{entry['width']} (image id {entry['id']})"
            )
        return image

    def _mask(self, ann: dict, image_id: int, height: int, width: int) -> np.ndarray:
        """:func:`annotation_to_mask`, with what pycocotools still refuses named as a :class:`DatasetError`."""
        try:
            return annotation_to_mask(ann, height, width)
        except Exception as error:  # pycocotools raises bare ValueError, TypeError or Exception
            raise DatasetError(
                f"{self.annotation_file}: pycocotools cannot decode the segmentation of annotation "
                f"{ann.get('id')} of image {image_id}: {error}"
            ) from error

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.images[index]
        image = self.load_image(index)
        height, width = int(image.shape[1]), int(image.shape[2])
        boxes, labels, masks = [], [], []
        for ann in self.annotations[entry["id"]]:
            x, y, w, h = ann["bbox"]
            boxes.append([x, y, x + w, y + h])
            labels.append(self.category_to_label[ann["category_id"]])
            masks.append(self._mask(ann, entry["id"], height, width))
        boxes = clip_boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), height, width)
        masks = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
        keep = nonempty_instances(boxes, masks)  # detectron2's filter_empty_instances
        sample = {
            "image": image,
            "boxes": boxes[keep],
            "labels": torch.tensor(labels, dtype=torch.int64)[keep],
            "masks": masks[keep],
            "image_id": entry["id"],
            "height": height,
            "width": width,
        }
        return self.transform(sample) if self.transform is not None else sample
