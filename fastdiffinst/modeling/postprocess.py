"""From decoder outputs to COCO-style instances (spec §5).

1. :func:`topk_candidates` — top-N over the flattened (proposal × class) sigmoid scores, with the
   box and the filters of each chosen proposal (a proposal can appear under several classes).
2. :func:`nms_keep` / :func:`select_detections` — class-aware NMS (IoU 0.5) of one image's candidates, in descending
   score order; no score threshold, as the official code.
3. :func:`paste_masks` — sigmoid masks at stride 4 → aligned ×4 upsampling → crop to the unpadded
   size → bilinear resize to the output size → threshold 0.5 → zero outside the (truncated) box;
   :func:`mask_chunk_size` bounds the instances per call so that the full-resolution
   temporaries stay within a memory budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiffinst.modeling.mask_branch import aligned_bilinear
from fastdiffinst.reference.box_diffusion import clip_boxes

# Full-resolution temporaries of one mask chunk stay under this (the result itself is apart).
MASK_CHUNK_BUDGET_BYTES = 192 * 2**20
MAX_MASK_CHUNK = 64


@dataclass
class Candidates:
    """Per image: ``boxes [M, 4]`` (absolute xyxy), ``scores [M]``, ``labels [M]`` int64,
    ``kernels [M, P]`` and ``proposals [M]`` int64 (the proposal each came from)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    kernels: Tensor
    proposals: Tensor

    def __getitem__(self, index: Tensor) -> "Candidates":
        return Candidates(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    @staticmethod
    def cat(parts: list["Candidates"]) -> "Candidates":
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


def mask_chunk_size(padded_size: tuple[int, int], output_size: tuple[int, int]) -> int:
    """Instances per chunk of :func:`paste_masks`: its full-resolution fp32 temporaries (two at
    the padded size, two at the output size) fit in :data:`MASK_CHUNK_BUDGET_BYTES`."""
    per_instance = 4 * (2 * padded_size[0] * padded_size[1] + 2 * output_size[0] * output_size[1])
    return max(1, min(MAX_MASK_CHUNK, MASK_CHUNK_BUDGET_BYTES // per_instance))


def paste_masks(mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int],
                output_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Masks at full resolution, the official ``detector_postprocess`` + ``clip_mask``. Callers
    bound the instances per call with :func:`mask_chunk_size`.

    Args:
        mask_probs: ``[n, Hm, Wm]`` sigmoid probabilities at stride 4 of the padded image.
        boxes: ``[n, 4]`` boxes already scaled and clipped to ``output_size``.
        image_size: the unpadded resized size (h, w) the model saw.
        output_size: (H, W) of the result.
    Returns:
        ``[n, H, W]`` bool.
    """
    out_h, out_w = output_size
    full = aligned_bilinear(mask_probs[:, None].float(), 4)[:, :, :image_size[0], :image_size[1]]
    # At scale 1 this bilinear resize is the identity (sample i reads pixel i exactly): skipped.
    if (out_h, out_w) != tuple(image_size):
        full = F.interpolate(full, size=(out_h, out_w), mode="bilinear", align_corners=False)
    resized = full[:, 0]
    # clip_mask truncates the box to integers and keeps rows y1..y2-1, columns x1..x2-1.
    corners = boxes.to(torch.int64)
    rows = torch.arange(out_h, device=boxes.device)
    cols = torch.arange(out_w, device=boxes.device)
    inside_rows = (rows[None, :] >= corners[:, 1, None]) & (rows[None, :] < corners[:, 3, None])
    inside_cols = (cols[None, :] >= corners[:, 0, None]) & (cols[None, :] < corners[:, 2, None])
    return (resized > threshold) & inside_rows[:, :, None] & inside_cols[:, None, :]
