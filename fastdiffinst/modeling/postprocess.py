"""From decoder outputs to COCO-style instances (docs/official-model.md §5).

1. :func:`topk_candidates` — top-N over the flattened (proposal × class) sigmoid scores, with the
   box and the filters of each chosen proposal (a proposal can appear under several classes).
2. :func:`nms_keep` / :func:`select_detections` — class-aware NMS (IoU 0.5) of one image's candidates, in descending
   score order; no score threshold, as the official code.
3. Masks: :func:`fastdiffinst.ops.paste_masks` (fused path) or the official formulation
   :func:`fastdiffinst.reference.masks.paste_masks` — sigmoid masks at stride 4 → aligned ×4
   upsampling → crop to the unpadded size → bilinear resize to the output size → threshold 0.5 →
   zero outside the (truncated) box; :func:`fused_mask_chunk_size` and
   :func:`official_mask_chunk_size` bound the instances per call so that the temporaries stay
   within a memory budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastdiffinst.common.boxes import clip_boxes

# The temporaries of one chunk of mask pasting stay under this (the result itself is apart).
MASK_CHUNK_BUDGET_BYTES = 192 * 2**20
# Chunks of the official formulation beyond this gain nothing.
MAX_MASK_CHUNK = 64
# The fused op's chunks: its temporaries are the stride-4 probabilities and its bool output before
# it joins the result (55 instances at 800×1216); more per call gains nothing measurable.
FUSED_MASK_CHUNK_BUDGET_BYTES = 64 * 2**20


@dataclass
class Candidates:
    """Per image: ``boxes [M, 4]`` (absolute xyxy), ``scores [M]``, ``labels [M]`` int64,
    ``kernels [M, P]`` and ``proposals [M]`` int64 (the proposal each came from)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    kernels: Tensor
    proposals: Tensor

    def __getitem__(self, index: Tensor) -> Candidates:
        return Candidates(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    @staticmethod
    def cat(parts: list[Candidates]) -> Candidates:
        return Candidates(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Candidates)))


def topk_candidates(class_logits: Tensor, boxes: Tensor, kernels: Tensor,
                    k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-``k`` (proposal, class) pairs of every image.

    Args: ``class_logits [B, N, K]``, ``boxes [B, N, 4]``, ``kernels [B, N, P]``.
    Returns ``(boxes [B, k, 4], scores [B, k], labels [B, k], kernels [B, k, P], proposals [B, k])``
    in ``topk(sorted=False)`` order, as the official code.
    """
    num_classes = class_logits.shape[-1]
    scores, flat = torch.sigmoid(class_logits).flatten(1).topk(k, dim=1, sorted=False)
    proposal = torch.div(flat, num_classes, rounding_mode="floor")
    labels = flat - proposal * num_classes
    pick_boxes = torch.gather(boxes, 1, proposal[..., None].expand(-1, -1, 4))
    pick_kernels = torch.gather(kernels, 1, proposal[..., None].expand(-1, -1, kernels.shape[-1]))
    return pick_boxes, scores, labels, pick_kernels, proposal


def nms_keep(candidates: Candidates, iou_threshold: float) -> Tensor:
    """Indices of the candidates kept by class-aware NMS (torchvision ``batched_nms``, as
    detectron2), by descending score."""
    from torchvision.ops import batched_nms

    return batched_nms(candidates.boxes.float(), candidates.scores.float(), candidates.labels, iou_threshold)


def select_detections(candidates: Candidates, iou_threshold: float, use_nms: bool) -> Candidates:
    """The candidates kept by :func:`nms_keep` (all of them without NMS). Candidates with a
    non-finite box are dropped first: one NaN coordinate would disable torchvision's batched NMS
    for the whole image, and such boxes never survive post-processing anyway."""
    finite = torch.isfinite(candidates.boxes).all(dim=1)
    if not bool(finite.all()):
        candidates = candidates[finite]
    return candidates[nms_keep(candidates, iou_threshold)] if use_nms else candidates


def scale_and_clip_boxes(boxes: Tensor, image_size: tuple[int, int], output_size: tuple[int, int]) -> Tensor:
    """Boxes of the resized image (h, w) -> the output size (H, W), clipped to it."""
    (h, w), (out_h, out_w) = image_size, output_size
    scale = boxes.new_tensor([out_w / w, out_h / h, out_w / w, out_h / h])
    return clip_boxes(boxes * scale, out_h, out_w)


def fused_mask_chunk_size(mask_size: tuple[int, int], output_size: tuple[int, int]) -> int:
    """Instances per call of the fused :func:`fastdiffinst.ops.paste_masks`, so that its
    temporaries (the stride-4 fp32 probabilities of ``mask_size`` and its bool result before it
    joins the others) fit in :data:`FUSED_MASK_CHUNK_BUDGET_BYTES`."""
    (mask_h, mask_w), (out_h, out_w) = mask_size, output_size
    return max(1, FUSED_MASK_CHUNK_BUDGET_BYTES // (4 * mask_h * mask_w + out_h * out_w))


def official_mask_chunk_size(mask_size: tuple[int, int], output_size: tuple[int, int]) -> int:
    """Instances per call of the official chain, so that its temporaries (four fp32 maps per
    instance: two at the padded size, two at the output size) fit in
    :data:`MASK_CHUNK_BUDGET_BYTES`."""
    (mask_h, mask_w), (out_h, out_w) = mask_size, output_size
    per_instance = 4 * (2 * 16 * mask_h * mask_w + 2 * out_h * out_w)
    return max(1, min(MAX_MASK_CHUNK, MASK_CHUNK_BUDGET_BYTES // per_instance))


def paste_in_chunks(paste: Callable[..., Tensor], probs_of: Callable[[int, int], Tensor], boxes: Tensor,
                    chunk: int, image_size: tuple[int, int], output_size: tuple[int, int]) -> Tensor:
    """``[n, H, W]`` bool masks of ``n = len(boxes)`` instances, ``chunk`` at a time:
    ``paste(probs_of(start, end), boxes[start:end], image_size, output_size)``. With one chunk its
    result is the masks; with several, each is copied into place."""
    n = boxes.shape[0]
    if 0 < n <= chunk:
        return paste(probs_of(0, n), boxes, image_size, output_size)
    masks = torch.empty((n,) + tuple(output_size), dtype=torch.bool, device=boxes.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        # Kept in names on purpose: the previous chunk's tensors are freed only once the next
        # ones exist. Freeing them first (an inline expression) measured 135 instead of 59 MiB of
        # peak RSS beyond the result for 500 instances at 800x1216 on glibc's allocator
        # (tests/test_model.py::test_postprocess_memory_at_500_instances_on_800x1216).
        probs = probs_of(start, end)
        pasted = paste(probs, boxes[start:end], image_size, output_size)
        masks[start:end] = pasted
    return masks
