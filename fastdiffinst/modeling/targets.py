"""Training targets: checked, clipped and converted from the user's per-image dicts.

Each image's target is ``{"boxes": [G, 4] absolute xyxy in the image's pixels, "labels": [G] int64
in [0, K), "masks": [G, h, w]}`` (bool, uint8 or float; foreground where > 0.5), with (h, w) the
image's size. Boxes are clipped to the image; instances whose clipped box is at most 1e-5 wide or
high, or whose mask is empty, are dropped (detectron2's ``filter_empty_instances``, which the
official data pipeline applies). Reversed boxes, non-finite values,
out-of-range labels and masks of another size raise ``ValueError`` naming the image and the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastdiffinst.common.boxes import box_xyxy_to_cxcywh, clip_boxes, nonempty_instances

# GT masks are sampled at the mask features' pixel centres: rows and columns 2, 6, 10, ...
# (docs/official-model.md §4.4).
MASK_STRIDE = 4
# Boxes at most this wide or high are empty (detectron2 ``Boxes.nonempty``).
EMPTY_BOX = 1e-5


@dataclass
class ImageTargets:
    """One image's GT: ``labels [G]`` int64, ``boxes [G, 4]`` absolute xyxy (fp32), ``whwh [4]``
    (w, h, w, h) of the unpadded image."""

    labels: Tensor
    boxes: Tensor
    whwh: Tensor

    @property
    def boxes_cxcywh(self) -> Tensor:
        """Normalised (cx, cy, w, h), as the official targets store them."""
        return box_xyxy_to_cxcywh(self.boxes / self.whwh)


@dataclass
class TrainingTargets:
    """Per-image targets and every image's GT masks at the mask-feature resolution:
    ``masks [ΣG, Hp/4, Wp/4]`` uint8 (0/1), image b's rows starting at ``offsets[b]``."""

    images: list[ImageTargets]
    masks: Tensor
    offsets: list[int]

    @property
    def counts(self) -> list[int]:
        return [t.labels.numel() for t in self.images]


def _check_image(b: int, target: object, image_size: tuple[int, int], num_classes: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(target, Mapping) or not {"boxes", "labels", "masks"} <= set(target):
        raise ValueError(f"targets[{b}] must be a dict with 'boxes', 'labels' and 'masks'")
    boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
    for name, value in (("boxes", boxes), ("labels", labels), ("masks", masks)):
        if not isinstance(value, Tensor):
            raise TypeError(f"targets[{b}]['{name}'] must be a Tensor, got {type(value).__name__}")
    count = labels.shape[0] if labels.dim() == 1 else -1
    if count < 0 or labels.dtype != torch.int64:
        raise ValueError(f"targets[{b}]['labels'] must be int64 [G], got {labels.dtype} {tuple(labels.shape)}")
    if boxes.shape != (count, 4) or not boxes.is_floating_point():
        raise ValueError(f"targets[{b}]['boxes'] must be a float [G, 4] = [{count}, 4] tensor (xyxy), got "
                         f"{boxes.dtype} {tuple(boxes.shape)}")
    h, w = image_size
    if masks.shape != (count, h, w):
        raise ValueError(f"targets[{b}]['masks'] must be [G, H, W] = [{count}, {h}, {w}] (the image's size), "
                         f"got {tuple(masks.shape)}")
    if count and not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"targets[{b}]['boxes'] must be finite")
    bad = (labels < 0) | (labels >= num_classes)
    if count and bool(bad.any()):
        raise ValueError(f"targets[{b}]['labels'] must be in [0, {num_classes}), got {labels[bad][:10].tolist()}")
    if count and bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
        raise ValueError(f"targets[{b}]['boxes'] must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1")
    return boxes.to(device, dtype), labels.to(device), masks.to(device)


def prepare_targets(targets: Sequence[Mapping[str, Tensor]], image_sizes: list[tuple[int, int]],
                    padded_size: tuple[int, int], num_classes: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> TrainingTargets:
    """Checks and converts the targets of a batch (see the module docstring); boxes in ``dtype``
    (the model's)."""
    if not isinstance(targets, Sequence) or len(targets) != len(image_sizes):
        length = len(targets) if hasattr(targets, "__len__") else "?"
        raise ValueError(f"targets must be a list with one dict per image ({len(image_sizes)}), "
                         f"got {type(targets).__name__} of length {length}")
    map_h, map_w = padded_size[0] // MASK_STRIDE, padded_size[1] // MASK_STRIDE
    start = MASK_STRIDE // 2
    images, masks, offsets, offset = [], [], [], 0
    for b, (target, (h, w)) in enumerate(zip(targets, image_sizes)):
        boxes, labels, gt_masks = _check_image(b, target, (h, w), num_classes, device, dtype)
        whwh = torch.tensor([w, h, w, h], dtype=dtype, device=device)
        boxes = clip_boxes(boxes, h, w)
        keep = nonempty_instances(boxes, gt_masks, EMPTY_BOX)
        if not bool(keep.all()):
            boxes, labels, gt_masks = boxes[keep], labels[keep], gt_masks[keep]
        sampled = gt_masks[:, start::MASK_STRIDE, start::MASK_STRIDE] > 0.5
        grid = torch.zeros((labels.numel(), map_h, map_w), dtype=torch.uint8, device=device)
        grid[:, :sampled.shape[1], :sampled.shape[2]] = sampled
        images.append(ImageTargets(labels, boxes, whwh))
        masks.append(grid)
        offsets.append(offset)
        offset += labels.numel()
    return TrainingTargets(images, torch.cat(masks), offsets)
