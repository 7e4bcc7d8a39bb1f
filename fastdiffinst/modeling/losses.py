"""DiffusionInst's training losses (docs/official-model.md §4): per decoder stage, the dynamic-k matcher, then

* ``loss_ce`` — sigmoid focal loss (α 0.25, γ 2) over every (query, class), one-hot targets for the
  matched queries, background for the rest; LVIS: restricted to the federated class subset;
* ``loss_bbox`` — L1 between matched predicted and GT boxes, both normalised xyxy;
* ``loss_giou`` — 1 − GIoU of the matched absolute boxes;
* ``loss_masks`` — ``mask_weight`` × dice between the matched queries' dynamic masks (stride 4,
  the whole padded map) and their GT masks sampled at the same pixels; on the fused op
  (:func:`fastdiffinst.ops.dynamic_mask_dice_sums`) no ``[n, H, W]`` probabilities are stored.

Each term is divided by the number of matched queries in the local batch (at least 1 for the focal
loss; no match at all gives zeros that keep the graph). The last stage's terms have no suffix, the
auxiliary stages' ``_0 … _{S-2}``; ``loss_ce``, ``loss_bbox`` and ``loss_giou`` are returned
multiplied by their weights (2, 5, 2), ``loss_masks`` carries its own factor, as the official code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from fastdiffinst.common.boxes import box_cxcywh_to_xyxy
from fastdiffinst.common.mask_head import dice_loss_from_sums
from fastdiffinst.config import ModelConfig
from fastdiffinst.modeling.matcher import Match, dynamic_k_match
from fastdiffinst.modeling.targets import TrainingTargets

# (num_samples,) -> sampled negative classes: the federated loss's draw (generator or replay hook).
ClassSampler = Callable[[Tensor, int], Tensor]


def paired_giou(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """GIoU of each row pair ``[n, 4]`` × ``[n, 4]`` (xyxy): the diagonal of DETR's matrix."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    gt_area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    lt = torch.maximum(boxes[:, :2], gt_boxes[:, :2])
    rb = torch.minimum(boxes[:, 2:], gt_boxes[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = area + gt_area - inter
    hull = (torch.maximum(boxes[:, 2:], gt_boxes[:, 2:]) - torch.minimum(boxes[:, :2], gt_boxes[:, :2])).clamp(min=0)
    hull_area = hull.prod(dim=1)
    return inter / union - (hull_area - union) / hull_area


def federated_classes(target_classes: Tensor, num_classes: int, num_fed_classes: int, weights: Tensor,
                      sample: ClassSampler) -> Tensor:
    """detectron2's ``get_fed_loss_classes``: the classes present in ``target_classes`` (background
    K included) plus negatives sampled without replacement ∝ ``weights``, ``num_fed_classes`` in all.
    Returns a ``[K]`` 0/1 float mask."""
    present = torch.unique(target_classes)
    prob = present.new_ones(num_classes + 1).float()
    prob[-1] = 0
    if len(present) < num_fed_classes:
        prob[:num_classes] = weights.float()
        prob[present] = 0
        count = num_fed_classes - len(present)
        sampled = sample(prob, count)
        if sampled.shape != (count,) or bool(((sampled < 0) | (sampled >= num_classes)).any()) \
                or len(torch.unique(sampled)) != count:
            raise ValueError(f"the federated loss needs {count} distinct negative classes in [0, {num_classes}), "
                             f"got {sampled.tolist()}")
        present = torch.cat([present, sampled])
    mask = present.new_zeros(num_classes + 1)
    mask[present] = 1
    return mask[:num_classes].float()


class SetCriterion(nn.Module):
    """The losses of every stage. ``fed_loss_cls_weights`` (LVIS only) is the per-class weight of
    the federated sampling, ``image_count ** power``; official LVIS checkpoints carry it as
    ``criterion.fed_loss_cls_weights``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.loss
        self.num_classes = cfg.num_classes
        self.mask_channels = cfg.head.mask_head_channels
        self.mask_layers = cfg.head.mask_head_layers
        if self.cfg.use_fed_loss:
            self.register_buffer("fed_loss_cls_weights", torch.ones(cfg.num_classes))

    def set_class_image_counts(self, image_counts: Tensor) -> None:
        """Federated-loss weights from the training set's per-class image counts ``[K]``."""
        if not self.cfg.use_fed_loss:
            raise ValueError("the federated loss is off in this configuration (loss.use_fed_loss)")
        if image_counts.shape != (self.num_classes,):
            raise ValueError(f"image_counts must be [{self.num_classes}], got {tuple(image_counts.shape)}")
        if not bool(torch.isfinite(image_counts).all()) or bool((image_counts < 0).any()):
            raise ValueError("image_counts must be finite and non-negative")
        if int((image_counts > 0).sum()) < self.cfg.fed_loss_num_classes:
            raise ValueError(f"the federated loss samples {self.cfg.fed_loss_num_classes} classes, but only "
                             f"{int((image_counts > 0).sum())} have images")
        self.fed_loss_cls_weights.copy_(image_counts.float() ** self.cfg.fed_loss_freq_weight_power)

    def forward(self, class_logits: Tensor, boxes: Tensor, kernels: Tensor, mask_feats: Tensor,
                targets: TrainingTargets, dice_sums: Callable[..., Tensor],
                sample_classes: ClassSampler) -> tuple[dict[str, Tensor], list[list[Match]]]:
        """Losses of all stages from the stacks ``[S, B, N, ·]`` -> (loss dict, matches per stage
        in the official order: the last stage, then stages 0, 1, ...)."""
        stages = class_logits.shape[0]
        losses, matches = {}, []
        for stage in [stages - 1] + list(range(stages - 1)):
            suffix = "" if stage == stages - 1 else f"_{stage}"
            stage_matches = [dynamic_k_match(class_logits[stage, b], boxes[stage, b], t.labels, t.boxes, t.whwh,
                                             self.cfg) for b, t in enumerate(targets.images)]
            matches.append(stage_matches)
            terms = self.stage_losses(class_logits[stage], boxes[stage], kernels[stage], mask_feats, targets,
                                      stage_matches, dice_sums, sample_classes)
            losses.update({name + suffix: value for name, value in terms.items()})
        return losses, matches

    def stage_losses(self, class_logits: Tensor, boxes: Tensor, kernels: Tensor, mask_feats: Tensor,
                     targets: TrainingTargets, matches: list[Match], dice_sums: Callable[..., Tensor],
                     sample_classes: ClassSampler) -> dict[str, Tensor]:
        """One stage: ``class_logits [B, N, K]``, ``boxes [B, N, 4]``, ``kernels [B, N, P]``."""
        cfg = self.cfg
        batch, num, k = class_logits.shape
        target_classes = torch.full((batch, num), k, dtype=torch.int64, device=class_logits.device)
        image_index, gt_rows = [], []
        for b, (match, target) in enumerate(zip(matches, targets.images)):
            target_classes[b, match.selected] = target.labels[match.gt_index]
            image_index.append(torch.full_like(match.gt_index, b))
            gt_rows.append(match.gt_index + targets.offsets[b])
        image_index, gt_rows = torch.cat(image_index), torch.cat(gt_rows)
        selected = torch.stack([m.selected for m in matches])
        num_matched = int(gt_rows.numel())

        onehot = F.one_hot(target_classes, k + 1)[..., :k].to(class_logits.dtype)
        focal = sigmoid_focal_loss(class_logits, onehot, cfg.focal_alpha, cfg.focal_gamma)
        if cfg.use_fed_loss:
            focal = focal * federated_classes(target_classes, k, cfg.fed_loss_num_classes, self.fed_loss_cls_weights,
                                              sample_classes)
        losses = {"loss_ce": cfg.class_weight * focal.sum() / max(num_matched, 1)}
        if num_matched == 0:
            # Zeros in the graph of every predicted tensor, so that every parameter gets a (zero)
            # gradient: DDP needs one from each rank.
            zero = (boxes.sum() + kernels.sum() + mask_feats.sum()) * 0
            return {**losses, "loss_bbox": zero, "loss_giou": zero, "loss_masks": zero}

        pred = boxes[selected]  # image-major, query order: the order of gt_rows
        whwh = torch.stack([t.whwh for t in targets.images])[image_index]
        gt_boxes = torch.cat([t.boxes[m.gt_index] for m, t in zip(matches, targets.images)])
        gt_normalised = box_cxcywh_to_xyxy(torch.cat([t.boxes_cxcywh[m.gt_index]
                                                      for m, t in zip(matches, targets.images)]))
        losses["loss_bbox"] = cfg.l1_weight * F.l1_loss(pred / whwh, gt_normalised, reduction="sum") / num_matched
        losses["loss_giou"] = cfg.giou_weight * (1 - paired_giou(pred, gt_boxes)).sum() / num_matched

        params = kernels[selected]
        sums = dice_sums(mask_feats, params, image_index, targets.masks, gt_rows, channels=self.mask_channels,
                         num_layers=self.mask_layers)
        dice = dice_loss_from_sums(sums)
        losses["loss_masks"] = cfg.mask_weight * dice.sum() / num_matched
        return losses
