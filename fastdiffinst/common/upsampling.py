"""CondInst's aligned bilinear upsampling, used by the mask branch and by the mask pasting of
post-processing (the model, the fused op's reference and the official chain).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """CondInst's aligned ×``factor`` upsampling: ``[B, C, h, w] -> [B, C, f·h, f·w]``.

    Input pixel i lands on output index ``f·i + f//2`` (pixel centres stay aligned with a stride-f
    map): replicate-pad right/bottom by 1, bilinear with ``align_corners=True`` to
    ``(f·h + 1, f·w + 1)``, replicate-pad left/top by ``f // 2``, crop to ``(f·h, f·w)``.
    """
    if x.dim() != 4:
        raise ValueError(f"aligned_bilinear: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"aligned_bilinear: factor must be a positive integer, got {factor!r}")
    if factor == 1:
        return x
    h, w = x.shape[2:]
    x = _replicate(_replicate(x, 3, 0, 1), 2, 0, 1)
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = _replicate(_replicate(x, 3, factor // 2, 0), 2, factor // 2, 0)
    return x[:, :, :factor * h, :factor * w]


def _replicate(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    """``F.pad(mode="replicate")`` along one dimension, as concatenated edge slices (inductor
    miscompiles the backward of ``replication_pad2d`` on CPU)."""
    parts = [x.narrow(dim, 0, 1).expand(*x.shape[:dim], before, *x.shape[dim + 1:])] if before else []
    parts.append(x)
    if after:
        parts.append(x.narrow(dim, x.shape[dim] - 1, 1).expand(*x.shape[:dim], after, *x.shape[dim + 1:]))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else x
