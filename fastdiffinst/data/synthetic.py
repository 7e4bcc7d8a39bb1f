"""The embedded synthetic shapes set: instance segmentation with no download.

Every image (128–256 px a side) holds 2–6 shapes of 8 classes on a textured background, drawn
back to front so that shapes overlap; an instance's mask is exactly its visible pixels (the
rasterised shape minus the shapes drawn over it), and instances left with fewer than
:data:`MIN_VISIBLE_PIXELS` visible pixels are dropped. Everything is a deterministic function of
``(seed, split, index)``. :func:`write_split` writes a split as COCO json (RLE masks, boxes from the
masks) + PNG files; :func:`synthetic_split` returns a split's folder, generating it on first use
under ``$FASTDIFFINST_DATA`` (default ``~/.cache/fastdiffinst``); :func:`render_samples` gives the
first N images of a split in memory, writing nothing (the demo's ``--synthetic N``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle", "ellipse", "hexagon", "star", "cross", "ring")
SPLITS = {"train": 2000, "val": 200}
MIN_VISIBLE_PIXELS = 48
FORMAT_VERSION = 1
_SPLIT_SEEDS = {"train": 0, "val": 1}


def _polygon_inside(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Pixels strictly on the inner side of every edge of a convex counter-clockwise polygon."""
    inside = np.ones(np.broadcast(xs, ys).shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= 0
    return inside


def _regular(cx: float, cy: float, radius: float, sides: int, angle: float) -> np.ndarray:
    t = angle + np.arange(sides) * 2 * math.pi / sides
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def shape_mask(kind: str, height: int, width: int, cx: float, cy: float, size: float, angle: float,
               aspect: float) -> np.ndarray:
    """``[height, width]`` bool raster of one shape (pixel centres at integer + 0.5)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    # Coordinates in the shape's frame (rotated by ``angle``).
    u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
    v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
    r = size / 2
    if kind == "circle":
        return u**2 + v**2 <= r**2
    if kind == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1
    if kind == "ring":
        d = u**2 + v**2
        return (d <= r**2) & (d >= (0.55 * r) ** 2)
    if kind == "cross":
        arm = 0.32 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    if kind == "triangle":
        return _polygon_inside(u, v, _regular(0, 0, r, 3, -math.pi / 2))
    if kind == "hexagon":
        return _polygon_inside(u, v, _regular(0, 0, r, 6, 0))
    if kind == "star":  # a hexagram: two triangles
        return _polygon_inside(u, v, _regular(0, 0, r, 3, -math.pi / 2)) | \
            _polygon_inside(u, v, _regular(0, 0, r, 3, math.pi / 2))
    raise ValueError(f"unknown shape {kind!r}; the classes are {CLASSES}")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour field with stripes and mild noise, ``[H, W, 3]`` float in 0–255."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    base = rng.uniform(40, 215, size=3)
    image = np.empty((height, width, 3))
    for c in range(3):
        gx, gy = rng.uniform(-0.6, 0.6, size=2)
        freq, phase = rng.uniform(0.02, 0.12), rng.uniform(0, 2 * math.pi)
        theta = rng.uniform(0, math.pi)
        stripes = 18 * np.sin(freq * (xs * math.cos(theta) + ys * math.sin(theta)) + phase)
        image[..., c] = base[c] + gx * (xs - width / 2) + gy * (ys - height / 2) + stripes
    return image + rng.normal(0, 4, size=image.shape)


def render(seed: int, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """One image: ``uint8 [H, W, 3]`` and its instances ``[{"category": int, "mask": bool [H, W]}]``
    (front-most last)."""
    rng = np.random.default_rng([seed, _SPLIT_SEEDS[split], index])
    height, width = (int(v) for v in rng.integers(128, 257, size=2))
    image = _background(rng, height, width)
    visible = []
    for _ in range(int(rng.integers(2, 7))):
        kind = int(rng.integers(len(CLASSES)))
        size = rng.uniform(0.18, 0.5) * min(height, width)
        cx, cy = rng.uniform(size * 0.3, width - size * 0.3), rng.uniform(size * 0.3, height - size * 0.3)
        mask = shape_mask(CLASSES[kind], height, width, cx, cy, size, rng.uniform(0, 2 * math.pi),
                          rng.uniform(0.45, 0.8))
        if not mask.any():
            continue
        colour = rng.uniform(0, 255, size=3)
        # The shape's own texture: a shading wave across it and mild noise.
        shade = np.broadcast_to(rng.uniform(-25, 25) * np.sin(np.arange(width) * rng.uniform(0.05, 0.3)),
                                (height, width))
        noise = rng.normal(0, 3, size=(int(mask.sum()), 3))
        image[mask] = np.clip(colour[None, :] + shade[mask][:, None] + noise, 0, 255)
        for earlier in visible:  # the new shape occludes what it covers
            earlier["mask"] &= ~mask
        visible.append({"category": kind, "mask": mask})
    instances = [inst for inst in visible if int(inst["mask"].sum()) >= MIN_VISIBLE_PIXELS]
    return np.clip(image, 0, 255).astype(np.uint8), instances


def render_sample(index: int, split: str = "val", seed: int = 0) -> dict:
    """Image ``index`` of ``split`` in memory, as :class:`~fastdiffinst.data.InstanceDataset` reads it
    from the files :func:`write_split` writes (PNG is lossless; boxes are the masks' extents):
    ``{"image": uint8 [3, H, W], "boxes": [G, 4] float32 xyxy, "labels": [G] int64, "masks": [G, H, W]
    uint8, "image_id": index + 1, "height": H, "width": W}``. Nothing is written."""
    import torch

    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    image, instances = render(seed, split, index)
    height, width = image.shape[:2]
    boxes = []
    for inst in instances:
        ys, xs = np.nonzero(inst["mask"])
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    masks = np.stack([inst["mask"] for inst in instances]) if instances else np.zeros((0, height, width), bool)
    return {"image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([inst["category"] for inst in instances], dtype=torch.int64),
            "masks": torch.from_numpy(masks.astype(np.uint8)), "image_id": index + 1, "height": height, "width": width}


def render_samples(count: int, split: str = "val", seed: int = 0):
    """The first ``count`` images of ``split`` (:func:`render_sample`), rendered one at a time as
    they are iterated: the images of ``synthetic:N`` for any N >= ``count``, with no files."""
    for index in range(count):
        yield render_sample(index, split, seed)


def coco_categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]


def write_split(root: str | os.PathLike, split: str = "val", count: int | None = None, seed: int = 0) -> Path:
    """Writes ``count`` images of ``split`` (default :data:`SPLITS`) under ``root/split`` as
    ``images/*.png`` + ``annotations.json`` (COCO, RLE masks). Returns the split's folder."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    count = SPLITS[split] if count is None else count
    folder = Path(root) / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image, instances = render(seed, split, index)
        name = f"{index:05d}.png"
        Image.fromarray(image).save(folder / "images" / name)
        images.append({"id": index + 1, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for inst in instances:
            rle = mask_utils.encode(np.asfortranarray(inst["mask"].astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": inst["category"] + 1,
                                "segmentation": rle, "area": float(inst["mask"].sum()), "bbox": [x, y, w, h],
                                "iscrowd": 0})
    info = {"description": "fastdiffinst synthetic shapes", "version": FORMAT_VERSION, "seed": seed, "split": split}
    payload = {"info": info, "images": images, "annotations": annotations, "categories": coco_categories()}
    # Written last and atomically: a folder with annotations.json is complete.
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        json.dump(payload, f)
    os.replace(f.name, folder / "annotations.json")
    return folder


def default_root() -> Path:
    return Path(os.environ.get("FASTDIFFINST_DATA", Path.home() / ".cache" / "fastdiffinst"))


def synthetic_split(split: str = "val", count: int | None = None, seed: int = 0,
                    root: str | os.PathLike | None = None) -> Path:
    """The folder of a synthetic split, generated on first use (see :func:`write_split`)."""
    count = SPLITS.get(split, 0) if count is None else count
    base = Path(root) if root is not None else default_root()
    folder = base / f"synthetic-v{FORMAT_VERSION}-seed{seed}-{split}{count}"
    if not (folder / split / "annotations.json").is_file():
        write_split(folder, split, count, seed)
    return folder / split
