"""Augmentations of instance samples (docs/official-model.md §6): every transform moves the image,
the boxes and the masks together, so that masks stay aligned with their boxes.

A sample is the dict of :class:`fastdiffinst.data.coco.InstanceDataset` (``image uint8 [3, H, W]``,
``boxes [G, 4]`` xyxy, ``labels [G]``, ``masks uint8 [G, H, W]``; ``height``/``width`` stay the
original size, where evaluation reports results). Randomness comes from torch's generator (or one
passed in), which DataLoader workers seed per worker.

* :func:`official_train_transform` — the official policy: with probability 0.5 flip + resize the
  shortest edge to one of 480, 512, …, 800 (longest ≤ 1333); otherwise flip + resize to one of
  400/500/600 + a random crop of 384–600 px a side + the same multi-scale resize.
* :func:`eval_transform` — shortest edge 800, longest ≤ 1333.
Instances left without box area or mask pixels are dropped after each geometric step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import InterpolationMode, resize

from fastdiffinst.common.boxes import clip_boxes, nonempty_instances

Sample = dict
Transform = Callable[[Sample], Sample]


def _uniform_int(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _drop_empty(sample: Sample) -> Sample:
    boxes, masks = sample["boxes"], sample["masks"]
    keep = nonempty_instances(boxes, masks)
    if bool(keep.all()):
        return sample
    return {**sample, "boxes": boxes[keep], "labels": sample["labels"][keep], "masks": masks[keep]}


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.prob, self.generator = prob, generator

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand((), generator=self.generator)) >= self.prob:
            return sample
        width = sample["image"].shape[2]
        boxes = sample["boxes"].clone()
        boxes[:, [0, 2]] = width - sample["boxes"][:, [2, 0]]
        return {**sample, "image": sample["image"].flip(-1), "masks": sample["masks"].flip(-1), "boxes": boxes}


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge``: scale so the short side is ``short`` unless the long side
    would exceed ``max_size``; sizes rounded half up."""
    scale = short / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear with antialiasing (detectron2 resizes images with PIL's bilinear filter)."""
    return resize(image, list(size), InterpolationMode.BILINEAR, antialias=True)


def resize_sample(sample: Sample, size: tuple[int, int]) -> Sample:
    """Image bilinear (antialiased), masks nearest, boxes scaled."""
    height, width = sample["image"].shape[1:]
    new_h, new_w = size
    if (new_h, new_w) == (height, width):
        return sample
    image = _resize_image(sample["image"], size)
    masks = sample["masks"]
    if masks.shape[0]:
        masks = F.interpolate(masks[:, None].float(), size=(new_h, new_w), mode="nearest-exact")[:, 0].to(masks.dtype)
    else:
        masks = masks.new_zeros((0, new_h, new_w))
    scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
    return _drop_empty({**sample, "image": image, "masks": masks, "boxes": sample["boxes"] * scale})


class ResizeShortestEdge:
    """Resize to a short side chosen uniformly from ``sizes`` (longest side ≤ ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: int, generator: torch.Generator | None = None) -> None:
        if not sizes:
            raise ValueError("ResizeShortestEdge needs at least one size")
        self.sizes, self.max_size, self.generator = list(sizes), max_size, generator

    def __call__(self, sample: Sample) -> Sample:
        short = self.sizes[_uniform_int(0, len(self.sizes) - 1, self.generator)]
        height, width = sample["image"].shape[1:]
        return resize_sample(sample, shortest_edge_size(height, width, short, self.max_size))


class RandomCrop:
    """detectron2 ``RandomCrop("absolute_range", (low, high))``: crop height and width uniform in
    [min(low, side), min(high, side)], at a uniform position; boxes clipped to the crop."""

    def __init__(self, low: int, high: int, generator: torch.Generator | None = None) -> None:
        self.low, self.high, self.generator = low, high, generator

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample["image"].shape[1:]
        crop_h = _uniform_int(min(height, self.low), min(height, self.high), self.generator)
        crop_w = _uniform_int(min(width, self.low), min(width, self.high), self.generator)
        y0 = _uniform_int(0, height - crop_h, self.generator)
        x0 = _uniform_int(0, width - crop_w, self.generator)
        shift = torch.tensor([x0, y0, x0, y0], dtype=sample["boxes"].dtype)
        boxes = clip_boxes(sample["boxes"] - shift, crop_h, crop_w)
        return _drop_empty({**sample, "image": sample["image"][:, y0:y0 + crop_h, x0:x0 + crop_w],
                            "masks": sample["masks"][:, y0:y0 + crop_h, x0:x0 + crop_w], "boxes": boxes})


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample


class RandomChoice:
    """``first`` with probability ``prob``, else ``second``."""

    def __init__(self, first: Transform, second: Transform, prob: float = 0.5,
                 generator: torch.Generator | None = None) -> None:
        self.first, self.second, self.prob, self.generator = first, second, prob, generator

    def __call__(self, sample: Sample) -> Sample:
        chosen = self.first if float(torch.rand((), generator=self.generator)) < self.prob else self.second
        return chosen(sample)


TRAIN_SIZES = tuple(range(480, 801, 32))


def official_train_transform(sizes: Sequence[int] = TRAIN_SIZES, max_size: int = 1333,
                             crop_sizes: Sequence[int] = (400, 500, 600), crop: tuple[int, int] = (384, 600),
                             generator: torch.Generator | None = None, enable_crop: bool = True) -> Transform:
    """The official ``DiffusionInstDatasetMapper`` policy (module docstring); the sizes scale down
    for small data sets (e.g. the synthetic set); ``enable_crop=False`` keeps only the first branch."""
    flip = RandomFlip(0.5, generator)
    resize_train = ResizeShortestEdge(sizes, max_size, generator)
    if not enable_crop:
        return Compose([flip, resize_train])
    # detectron2's resize before the crop has no limit on the long side.
    cropped = Compose([flip, ResizeShortestEdge(crop_sizes, sys.maxsize, generator),
                       RandomCrop(crop[0], crop[1], generator), resize_train])
    return RandomChoice(Compose([flip, resize_train]), cropped, 0.5, generator)


def resize_for_test(image: torch.Tensor, short: int = 800, max_size: int = 1333) -> torch.Tensor:
    """An image ``uint8 [3, H, W]`` resized as :func:`eval_transform` resizes samples."""
    size = shortest_edge_size(int(image.shape[1]), int(image.shape[2]), short, max_size)
    return image if tuple(image.shape[1:]) == size else _resize_image(image, size)


def eval_transform(short: int = 800, max_size: int = 1333) -> Transform:
    """The test resize (shortest edge ``short``, longest ≤ ``max_size``)."""
    return ResizeShortestEdge([short], max_size)
