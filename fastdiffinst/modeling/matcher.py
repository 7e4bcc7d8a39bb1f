"""DiffusionDet's dynamic-k matcher (SimOTA-style, one-to-many), exactly as the official code
(docs/official-model.md §4.1), for one image and one decoder stage.

1. Geometry priors: a query is a candidate of GT g when its box centre lies strictly inside g
   (``in_box``) and strictly inside g's centre region of half-extent ``center_radius`` × (w, h)
   (``in_center``); ``fg`` = inside any box or any centre region.
2. Cost = ``l1_weight``·L1(normalised xyxy) + ``class_weight``·focal cost + ``giou_weight``·(−GIoU)
   + 100·¬(in_box ∧ in_center), plus 10000 for queries outside every prior.
3. Each GT g takes its k_g cheapest queries, k_g = max(1, ⌊Σ top-``ota_k`` IoUs of g⌋).
4. A query taken by several GTs keeps the cheapest. While some GT has no query: the rows of matched
   queries get +1e5, every unmatched GT takes its cheapest query, and multi-matched queries are
   resolved again — using the **stale** multi-match mask computed before the loop, as the official
   code does; in rare cases a query then stays matched to two GTs and the lower GT index wins.

Ties between equal costs go to the lower query index (a stable sort; ``torch.topk`` leaves them
unspecified). The repair loop is bounded by the number of queries (the official loop is not and
never ends when there are more GTs than queries); a GT still without a query after that stays
unmatched (``query_per_gt`` -1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou

from fastdiffinst.common.boxes import box_xyxy_to_cxcywh
from fastdiffinst.config import LossConfig


@dataclass
class Match:
    """``selected [N]`` bool (queries with a GT), ``gt_index [n_sel]`` int64 (the GT of each
    selected query, in query order), ``query_per_gt [G]`` int64 (each GT's cheapest matched query;
    -1 for a GT the bounded repair loop left without one)."""

    selected: Tensor
    gt_index: Tensor
    query_per_gt: Tensor


def focal_cost(probs: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """``[N, G]`` classification cost: focal positive minus focal negative term at each GT's class."""
    p = probs[:, labels]
    positive = alpha * (1 - p) ** gamma * (-(p + 1e-8).log())
    negative = (1 - alpha) * p**gamma * (-(1 - p + 1e-8).log())
    return positive - negative


def geometry_priors(boxes: Tensor, gt_boxes: Tensor, center_radius: float) -> tuple[Tensor, Tensor]:
    """``(fg [N], in_box_and_center [N, G])`` for query boxes and GT boxes, both absolute xyxy."""
    centers = box_xyxy_to_cxcywh(boxes)[:, :2]
    cx, cy = centers[:, 0:1], centers[:, 1:2]
    in_box = (cx > gt_boxes[:, 0]) & (cx < gt_boxes[:, 2]) & (cy > gt_boxes[:, 1]) & (cy < gt_boxes[:, 3])
    gt = box_xyxy_to_cxcywh(gt_boxes)
    half_w = center_radius * (gt_boxes[:, 2] - gt_boxes[:, 0])
    half_h = center_radius * (gt_boxes[:, 3] - gt_boxes[:, 1])
    in_center = ((cx > gt[:, 0] - half_w) & (cx < gt[:, 0] + half_w)
                 & (cy > gt[:, 1] - half_h) & (cy < gt[:, 1] + half_h))
    return in_box.any(1) | in_center.any(1), in_box & in_center


def matching_cost(logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor, image_whwh: Tensor,
                  cfg: LossConfig) -> Tensor:
    """``[N, G]`` cost of assigning query n to GT g (docs/official-model.md §4.1 steps 1–3)."""
    fg, in_both = geometry_priors(boxes, gt_boxes, cfg.center_radius)
    cost_class = focal_cost(logits.sigmoid(), gt_labels, cfg.focal_alpha, cfg.focal_gamma)
    cost_bbox = torch.cdist(boxes / image_whwh, gt_boxes / image_whwh, p=1)
    cost_giou = -generalized_box_iou(boxes, gt_boxes)
    cost = cfg.l1_weight * cost_bbox + cfg.class_weight * cost_class + cfg.giou_weight * cost_giou
    cost = cost + 100.0 * (~in_both)
    return cost + 10000.0 * (~fg)[:, None]


def _keep_cheapest(matching: Tensor, cost: Tensor, rows: Tensor) -> None:
    """In ``rows`` (a bool mask over queries), keep only the cheapest GT."""
    if bool(rows.any()):
        cheapest = cost[rows].argmin(dim=1)
        matching[rows] = 0
        matching[rows.nonzero().squeeze(1), cheapest] = 1


def dynamic_k_assign(cost: Tensor, ious: Tensor, ota_k: int) -> Match:
    """Steps 3–4 on a cost matrix ``[N, G]`` and the IoUs ``[N, G]``."""
    num_queries, num_gt = cost.shape
    cost = cost.clone()
    top_ious = torch.topk(ious, min(ota_k, num_queries), dim=0).values
    dynamic_k = torch.clamp(top_ious.sum(0).int(), min=1)
    order = torch.sort(cost, dim=0, stable=True).indices
    take = torch.arange(num_queries, device=cost.device)[:, None] < dynamic_k[None, :]
    matching = torch.zeros_like(cost).scatter_(0, order, take.to(cost.dtype))

    multi = matching.sum(1) > 1  # the official code reuses this stale mask inside the loop below
    _keep_cheapest(matching, cost, multi)
    for _ in range(num_queries):
        unmatched = matching.sum(0) == 0
        if not bool(unmatched.any()):
            break
        cost[matching.sum(1) > 0] += 100000.0
        gt = unmatched.nonzero().squeeze(1)
        matching[cost[:, gt].argmin(dim=0), gt] = 1
        if bool((matching.sum(1) > 1).any()):
            _keep_cheapest(matching, cost, multi)

    selected = matching.sum(1) > 0
    gt_index = matching[selected].argmax(dim=1)
    masked = torch.where(matching > 0, cost, torch.full_like(cost, float("inf")))
    query_per_gt = torch.where(matching.sum(0) > 0, masked.argmin(dim=0), -1)
    return Match(selected, gt_index, query_per_gt)


@torch.no_grad()
def dynamic_k_match(logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor, image_whwh: Tensor,
                    cfg: LossConfig) -> Match:
    """Matches one image's queries to its GTs.

    Args:
        logits: ``[N, K]`` class logits; boxes: ``[N, 4]`` predicted absolute xyxy.
        gt_labels: ``[G]`` int64; gt_boxes: ``[G, 4]`` absolute xyxy; image_whwh: ``[4]``.
    """
    num_queries = logits.shape[0]
    if gt_labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
        return Match(torch.zeros(num_queries, dtype=torch.bool, device=logits.device), empty, empty)
    cost = matching_cost(logits, boxes, gt_labels, gt_boxes, image_whwh, cfg)
    return dynamic_k_assign(cost, box_iou(boxes, gt_boxes), cfg.ota_k)


__all__ = ["Match", "dynamic_k_assign", "dynamic_k_match", "focal_cost", "geometry_priors",
           "matching_cost"]
