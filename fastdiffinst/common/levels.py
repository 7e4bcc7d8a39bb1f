"""The FPN level rule of detectron2's ``ROIPooler`` (the one home of it in Python)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def level_range(spatial_scales: Sequence[float]) -> tuple[int, int]:
    """(min_level, max_level) of feature maps with scales 1/2^min_level, ..., 1/2^max_level.

    Raises ``ValueError`` unless the scales are consecutive powers of two.
    """
    if len(spatial_scales) == 0:
        raise ValueError("spatial_scales must not be empty")
    levels = []
    for i, s in enumerate(spatial_scales):
        if not (isinstance(s, (int, float)) and s > 0 and math.isfinite(s)):
            raise ValueError(f"spatial_scales[{i}] must be a positive number, got {s!r}")
        level = -math.log2(s)
        if abs(level - round(level)) > 1e-6:
            raise ValueError(f"spatial_scales[{i}] must be a power of two (1/2^k), got {s!r}")
        levels.append(round(level))
    if any(b != a + 1 for a, b in zip(levels, levels[1:])):
        raise ValueError(f"spatial_scales must be consecutive powers of two from fine to coarse, "
                         f"got {list(spatial_scales)}")
    return levels[0], levels[-1]


def assign_fpn_levels(boxes: Tensor, min_level: int, max_level: int, canonical_box_size: int = 224,
                      canonical_level: int = 4) -> Tensor:
    """Level index (0 = min_level) of each box [K, 4] (x1, y1, x2, y2, image coordinates):
    floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)) clamped to
    [min_level, max_level], evaluated in fp32 exactly as detectron2 does. -> Tensor[K] int64.

    A box whose level is NaN (one reversed side gives a negative area) matches no level in
    detectron2, whose pooler then leaves its row zero: it gets -1 here."""
    b = boxes.float()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size + 1e-8))
    index = level.clamp(min=min_level, max=max_level).nan_to_num(float(min_level)).to(torch.int64) - min_level
    return torch.where(torch.isnan(level), -1, index)
