"""Where the command line's ``--data`` (and ``train --val-data``) points.

* ``synthetic`` — the embedded shapes set (2000 train / 200 val images), generated on first use;
  ``synthetic:N`` — N images per split, at most ``MAX_SYNTHETIC_IMAGES`` (small sets for tests and smoke runs).
* ``coco:ROOT`` — the COCO 2017 layout: ``ROOT/annotations/instances_{split}2017.json`` and ``ROOT/{split}2017/``.
* ``coco:ANNOTATIONS.json:IMAGES_DIR`` — any COCO-format data set: one json and the folder its
  ``file_name``s are relative to (detectron2's ``register_coco_instances``). The same data for any
  split: ``train`` takes its validation set from ``--val-data``. The spec is split at the first
  ``.json:``, so either path may itself hold a ``:`` (a spec without ``.json:`` is a ``ROOT``).
* ``lvis:ROOT`` — ``ROOT/lvis_v1_{split}.json`` (or ``ROOT/annotations/``), images under ``ROOT``
  as in the COCO layout (``train2017/``, ``val2017/``), found from their ``coco_url``.

Class names come from the json's ``categories`` (``name``, else the id). Errors raise
:class:`DatasetError`, naming the spec and what is missing or wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastdiffinst.data.coco import DatasetError, InstanceDataset
from fastdiffinst.data.synthetic import synthetic_split

# synthetic:N generates its N images on first use (~10 ms each): beyond this, a typo, not a request.
MAX_SYNTHETIC_IMAGES = 100_000

SPEC_FORMS = "'synthetic', 'synthetic:N', 'coco:ROOT', 'coco:ANNOTATIONS.json:IMAGES_DIR' or 'lvis:ROOT'"


def coco_json_spec(spec: str) -> tuple[Path, Path] | None:
    """``(annotation file, image folder)`` of a ``coco:ANNOTATIONS.json:IMAGES_DIR`` spec, None for
    any other spec (``coco:ROOT`` included); a DatasetError where either part is empty."""
    kind, _, value = spec.partition(":")
    if kind != "coco" or ".json:" not in value:
        return None
    annotations, _, images = value.partition(".json:")
    if not annotations or not images:
        raise DatasetError(f"data {spec!r}: coco:ANNOTATIONS.json:IMAGES_DIR needs both the json file and the image "
                           f"folder")
    return Path(annotations + ".json"), Path(images)


def is_synthetic(spec: str) -> bool:
    """Whether ``spec`` names the embedded shapes set (``synthetic`` or ``synthetic:N``)."""
    return spec.partition(":")[0] == "synthetic"


def is_split_independent(spec: str) -> bool:
    """Whether ``spec`` names the same data for every split (``coco:ANNOTATIONS.json:IMAGES_DIR``)."""
    try:
        return coco_json_spec(spec) is not None
    except DatasetError:
        return True


def dataset_from_spec(spec: str, split: str, transform: Callable[[dict], dict] | None = None,
                      like: InstanceDataset | None = None) -> InstanceDataset:
    """The dataset named by ``spec`` (see the module docstring); ``split`` is ``"train"`` or ``"val"``.

    ``like``: a dataset whose categories (ids and names) this one must have — the training set, when
    ``spec`` is the validation data; a DatasetError names both files where they differ."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    try:
        dataset = _resolve(spec, split, transform)
    except DatasetError as error:
        message = str(error)
        raise DatasetError(message if spec in message else f"data {spec!r}: {message}") from None
    if like is not None:
        _check_same_categories(dataset, like, spec)
    return dataset


def _resolve(spec: str, split: str, transform: Callable[[dict], dict] | None) -> InstanceDataset:
    kind, _, value = spec.partition(":")
    if kind == "synthetic":
        count = None
        if value:
            if not value.isdigit() or not 1 <= int(value) <= MAX_SYNTHETIC_IMAGES:
                raise DatasetError(f"--data synthetic:N needs an image count in [1, {MAX_SYNTHETIC_IMAGES}], "
                                   f"got {spec!r}")
            count = int(value)
        folder = synthetic_split(split, count)
        return InstanceDataset(folder / "annotations.json", folder / "images", transform)
    if kind in ("coco", "lvis") and not value:
        raise DatasetError(f"--data {kind}:ROOT needs the dataset folder, got {spec!r}")
    if kind == "coco":
        files = coco_json_spec(spec)
        if files is not None:
            annotation_file, image_root = files
            if not annotation_file.is_file():
                raise DatasetError(f"data {spec!r}: annotation file not found: {annotation_file}")
            if not image_root.is_dir():
                raise DatasetError(f"data {spec!r}: image folder not found: {image_root}")
            return InstanceDataset(annotation_file, image_root, transform)
        if value.endswith(".json") and not Path(value).is_dir():
            raise DatasetError(f"data {spec!r}: a json file needs its image folder: coco:ANNOTATIONS.json:IMAGES_DIR")
    root = Path(value)
    if kind in ("coco", "lvis") and not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    if kind == "coco":
        return InstanceDataset(root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017", transform)
    if kind == "lvis":
        candidates = [root / f"lvis_v1_{split}.json", root / "annotations" / f"lvis_v1_{split}.json"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DatasetError(f"no LVIS annotations for split {split!r}: looked for {', '.join(map(str, candidates))}")
        return InstanceDataset.lvis(found, root, transform)
    raise DatasetError(f"--data must be {SPEC_FORMS}, got {spec!r}")


def _check_same_categories(dataset: InstanceDataset, like: InstanceDataset, spec: str) -> None:
    """The model's labels index the categories in id order: both sets must list the same ones."""
    ours = [(c["id"], c.get("name")) for c in dataset.categories]
    theirs = [(c["id"], c.get("name")) for c in like.categories]
    if ours != theirs:
        difference = sorted(set(ours) ^ set(theirs), key=str)[:5]
        raise DatasetError(f"data {spec!r}: the categories of {dataset.annotation_file} ({len(ours)}) differ from "
                           f"those of {like.annotation_file} ({len(theirs)}), e.g. (id, name) {difference}")
