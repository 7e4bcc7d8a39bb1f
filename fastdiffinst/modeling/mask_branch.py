"""DiffusionInst's mask branch (docs/official-model.md §1.4).

P2, P3, P4 each pass Conv3×3 → BatchNorm → ReLU (``mask_refine``); P3 and P4 are upsampled to P2's
size with :func:`aligned_bilinear` and summed; a tower of Conv3×3 → BN → ReLU blocks and a final
1×1 conv give the mask features (8 channels at stride 4). Parameter names follow the official
``head.mask_refine.{i}.{0,1}`` / ``head.mask_head.{k}.{0,1}`` / ``head.mask_head.{last}``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastdiffinst.common.upsampling import aligned_bilinear


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class MaskBranch(nn.Module):
    """``forward([P2, P3, P4, ...]) -> mask_feats [B, out_channels, H/4, W/4]`` (levels beyond P4
    are ignored, as in the official code)."""

    num_levels = 3

    def __init__(self, in_channels: int, channels: int = 128, tower_convs: int = 4, out_channels: int = 8) -> None:
        super().__init__()
        self.mask_refine = nn.ModuleList(_conv_bn_relu(in_channels, channels) for _ in range(self.num_levels))
        tower = [_conv_bn_relu(channels, channels) for _ in range(tower_convs)]
        self.mask_head = nn.Sequential(*tower, nn.Conv2d(channels, out_channels, 1))
        self.out_channels = out_channels
        # The official head's reset gives every conv weight xavier-uniform (biases keep their defaults).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) < self.num_levels:
            raise ValueError(f"MaskBranch needs P2-P4 ({self.num_levels} levels), got {len(features)}")
        # Checked in eager mode only: under torch.compile the comparisons become guards relating the
        # levels' sizes, and with the widths dynamic inductor then fails to compile the BatchNorms'
        # backward ("Cannot convert expression to float", torch 2.14). Compiled, the model's own
        # padding (to the backbone's size divisibility) guarantees them.
        if not torch.compiler.is_compiling():
            self.check_level_sizes(features)
        x = self.mask_refine[0](features[0])
        for level, (refine, feature) in enumerate(zip(self.mask_refine[1:], features[1:self.num_levels]), start=1):
            x = x + aligned_bilinear(refine(feature), 2**level)
        return self.mask_head(x)

    def check_level_sizes(self, features: list[Tensor]) -> None:
        """Level ``i`` (P2 = 0) must be P2 downsampled by exactly ``2^i``."""
        height, width = features[0].shape[2:]
        for level, feature in enumerate(features[1:self.num_levels], start=1):
            if (height, width) != (feature.shape[2] * 2**level, feature.shape[3] * 2**level):
                raise ValueError(f"MaskBranch: level of size {tuple(feature.shape[2:])} does not divide P2's "
                                 f"{(height, width)} by {2**level}; pad images to a multiple of 32")
