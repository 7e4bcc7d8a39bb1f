"""Feature pyramid over a bottom-up backbone (detectron2 ``FPN``, docs/official-model.md §1.3).

Lateral 1×1 and output 3×3 convs (with bias, no norm) for levels 2..5, a nearest ×2 top-down path
with sum fusion, and P6 as a stride-2 max-pool of P5 (detectron2 ``LastLevelMaxPool``; computed
only on request because DiffusionInst never reads it). Parameter names are detectron2's
(``fpn_lateral2``, ``fpn_output5``, ``bottom_up.*``).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """detectron2's ``c2_xavier_fill``: kaiming-uniform with a = 1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    nn.init.constant_(module.bias, 0)


class FPN(nn.Module):
    """``forward([B, 3, H, W]) -> [P2, P3, P4, P5]`` (``out_channels`` each, strides 4..32).

    ``bottom_up`` returns its four stage outputs finest first and exposes ``out_channels``,
    ``out_strides`` and ``size_divisibility``.
    """

    def __init__(self, bottom_up: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.bottom_up = bottom_up
        self.out_channels = out_channels
        self.levels = [int(math.log2(s)) for s in bottom_up.out_strides]
        self.out_strides = list(bottom_up.out_strides)
        self.size_divisibility = bottom_up.size_divisibility
        for level, in_channels in zip(self.levels, bottom_up.out_channels):
            lateral = nn.Conv2d(in_channels, out_channels, 1)
            output = nn.Conv2d(out_channels, out_channels, 3, padding=1)
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.top_down(self.bottom_up(images))

    def top_down(self, bottom_up: list[Tensor]) -> list[Tensor]:
        """The bottom-up stage outputs (finest first) -> ``[P2, P3, P4, P5]``."""
        results = []
        prev = None
        for level, feature in zip(reversed(self.levels), reversed(bottom_up)):
            lateral = getattr(self, f"fpn_lateral{level}")(feature)
            prev = lateral if prev is None else lateral + F.interpolate(prev, scale_factor=2.0, mode="nearest")
            results.insert(0, getattr(self, f"fpn_output{level}")(prev))
        return results

    @staticmethod
    def p6(p5: Tensor) -> Tensor:
        """detectron2's ``LastLevelMaxPool`` (P6): not used by DiffusionInst."""
        return F.max_pool2d(p5, kernel_size=1, stride=2, padding=0)
