"""Where the command line's ``--data`` points.

* ``synthetic`` — the embedded shapes set (2000 train / 200 val images), generated on first use;
  ``synthetic:N`` — N images per split, at most ``MAX_SYNTHETIC_IMAGES`` (small sets for tests and smoke runs).
* ``coco:ROOT`` — ``ROOT/annotations/instances_{split}2017.json`` and ``ROOT/{split}2017/``.
* ``lvis:ROOT`` — ``ROOT/lvis_v1_{split}.json`` (or ``ROOT/annotations/``), images under ``ROOT``
  as in the COCO layout (``train2017/``, ``val2017/``), found from their ``coco_url``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastdiffinst.data.coco import DatasetError, InstanceDataset
from fastdiffinst.data.synthetic import synthetic_split

# synthetic:N generates its N images on first use (~10 ms each): beyond this, a typo, not a request.
MAX_SYNTHETIC_IMAGES = 100_000


def dataset_from_spec(spec: str, split: str, transform: Callable[[dict], dict] | None = None) -> InstanceDataset:
    """The dataset named by ``spec`` (see the module docstring); ``split`` is ``"train"`` or ``"val"``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
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
    raise DatasetError(f"--data must be 'synthetic', 'synthetic:N', 'coco:ROOT' or 'lvis:ROOT', got {spec!r}")
