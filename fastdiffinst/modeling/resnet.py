"""ResNet backbones with detectron2 semantics and parameter names (docs/official-model.md §1.2, §9.2).

Stem: 7×7/2 conv → FrozenBN → ReLU → 3×3/2 max-pool (padding 1). Stages res2..res5 of bottleneck
blocks (R-50/101/152; the stride sits in the 3×3 conv, ``STRIDE_IN_1X1 = False``) or basic blocks
(R-18/34); a projection shortcut wherever the channel count or the stride changes. Every conv
carries its norm as the attribute ``norm``, so the keys are detectron2's
(``stem.conv1.weight``, ``res3.0.conv2.norm.running_var``, ...). ``freeze_at`` freezes the stem
(1) and the first stages (2 = stem + res2), as ``BACKBONE.FREEZE_AT``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastdiffinst.config import RESNET_BLOCKS, ResNetConfig


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all buffers (detectron2's).

    Where gradients flow through it (trainable stages) it is the affine map
    ``x * w / sqrt(var + eps) + (b - mean * scale)``; elsewhere the fused ``batch_norm`` call, as
    detectron2 does (the two differ at rounding level).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


NORMS = ("FrozenBN", "GN")


def make_norm(norm: str, channels: int) -> nn.Module:
    """``"FrozenBN"`` (pretrained backbones, detectron2's default) or ``"GN"`` (GroupNorm with 32
    groups, or fewer when ``channels`` is not a multiple of 32: for training from scratch)."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"ResNet norm must be one of {NORMS}, got {norm!r}")


class ConvNorm(nn.Conv2d):
    """A bias-free conv followed by its norm (detectron2 ``Conv2d(norm=...)``); ReLU is applied by
    the caller."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 norm: str = "FrozenBN") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                         groups=groups, bias=False)
        self.norm = make_norm(norm, out_channels)
        # detectron2 c2_msra_fill.
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class BasicStem(nn.Module):
    """``[B, 3, H, W] -> [B, C, H/4, W/4]``."""

    def __init__(self, out_channels: int, norm: str = "FrozenBN") -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1×1 → 3×3 (stride, groups) → 1×1, residual, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int,
                 num_groups: int, norm: str = "FrozenBN") -> None:
        super().__init__()
        self.shortcut = (ConvNorm(in_channels, out_channels, 1, stride=stride, norm=norm)
                         if in_channels != out_channels or stride != 1 else None)
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, norm=norm)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, stride=stride, groups=num_groups, norm=norm)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        # In place, as detectron2: every tensor changed here is a fresh output whose producer's
        # backward does not read it (a convolution or a norm), and ReLU's backward reads its output;
        # fewer large allocations are fewer page faults on CPU.
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out)


class BasicBlock(nn.Module):
    """3×3 (stride) → 3×3, residual, ReLU (R-18/34)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str = "FrozenBN") -> None:
        super().__init__()
        self.shortcut = (ConvNorm(in_channels, out_channels, 1, stride=stride, norm=norm)
                         if in_channels != out_channels or stride != 1 else None)
        self.conv1 = ConvNorm(in_channels, out_channels, 3, stride=stride, norm=norm)
        self.conv2 = ConvNorm(out_channels, out_channels, 3, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu_(self.conv1(x)))  # in place: see BottleneckBlock
        out += self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out)


class ResNet(nn.Module):
    """``forward([B, 3, H, W]) -> [res2, res3, res4, res5]`` with strides 4, 8, 16, 32 and
    ``out_channels`` channels.

    With ``recompute`` set (the model's fused path), training stores only the input of each
    trainable stage and recomputes the stage in the backward (FrozenBN never updates its
    statistics and GroupNorm has none, so the recomputation is exact)."""

    size_divisibility = 32
    recompute = False

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        if cfg.depth not in RESNET_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {cfg.depth}")
        self.depth = cfg.depth
        self.stem = BasicStem(cfg.stem_out_channels, cfg.norm)
        in_channels, out_channels = cfg.stem_out_channels, cfg.res2_out_channels
        bottleneck = cfg.num_groups * cfg.width_per_group
        self.out_channels: list[int] = []
        self.out_strides = [4, 8, 16, 32]
        self.stage_names = ["res2", "res3", "res4", "res5"]
        for index, (name, blocks) in enumerate(zip(self.stage_names, RESNET_BLOCKS[cfg.depth])):
            stage = []
            for b in range(blocks):
                stride = 2 if index > 0 and b == 0 else 1
                if cfg.depth >= 50:
                    stage.append(BottleneckBlock(in_channels, out_channels, bottleneck, stride, cfg.num_groups,
                                                 cfg.norm))
                else:
                    stage.append(BasicBlock(in_channels, out_channels, stride, cfg.norm))
                in_channels = out_channels
            self.add_module(name, nn.Sequential(*stage))
            self.out_channels.append(out_channels)
            out_channels *= 2
            bottleneck *= 2
        self.freeze(cfg.freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stops gradients of the stem (``freeze_at >= 1``) and of res2..res{freeze_at}."""
        modules = [self.stem] + [getattr(self, n) for n in self.stage_names]
        for module in modules[:max(freeze_at, 0)]:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outputs = []
        for name in self.stage_names:
            stage = getattr(self, name)
            if self.recompute and torch.is_grad_enabled() and any(p.requires_grad for p in stage.parameters()):
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            outputs.append(x)
        return outputs
