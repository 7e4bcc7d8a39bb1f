"""CondInst's aligned bilinear upsampling, used by the mask branch and by the mask pasting of
post-processing (the model, the fused op's reference and the official chain).
"""

from __future__ import annotations

import torch
from torch import Tensor


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """CondInst's aligned ×``factor`` upsampling: ``[B, C, h, w] -> [B, C, f·h, f·w]``.

    Input pixel i lands on output index ``f·i + f//2`` (pixel centres stay aligned with a stride-f
    map). The official code replicate-pads right/bottom by 1, resizes bilinearly with
    ``align_corners=True`` to ``(f·h + 1, f·w + 1)``, replicate-pads left/top by ``f // 2`` and crops
    to ``(f·h, f·w)``. That resize samples the input at exactly ``i + r/f`` (r = 0 … f−1), so it is
    computed here as what it is, per axis (width, then height): ``(1 − r/f)·x[i] + (r/f)·x[i+1]``
    interleaved over r. The weights do not depend on the size, so
    the op compiles for any image size without symbolic resize scales (inductor fails on the
    backward of a bilinear resize whose width alone is dynamic), and for the power-of-two factors
    the model uses they are the resize's own, exact weights (the results agree with the resize's to
    rounding: a few ulp in fp32). Half-precision inputs are interpolated in fp32 and rounded once,
    as the resize kernel does.
    """
    if x.dim() != 4:
        raise ValueError(f"aligned_bilinear: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"aligned_bilinear: x must be floating-point, got {x.dtype}")
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"aligned_bilinear: factor must be a positive integer, got {factor!r}")
    if factor == 1:
        return x
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return _upsample_axis(_upsample_axis(wide, 3, int(factor)), 2, int(factor)).to(x.dtype)


def _upsample_axis(x: Tensor, dim: int, factor: int) -> Tensor:
    """Aligned ×``factor`` linear upsampling of ``x`` along ``dim`` (n -> factor·n)."""
    n = x.shape[dim]
    # x[i + 1], the last entry repeated (the official right/bottom replicate padding).
    following = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim=dim)
    phases = [x] + [x * (1 - r / factor) + following * (r / factor) for r in range(1, factor)]
    grid = torch.stack(phases, dim=dim + 1).flatten(dim, dim + 1)  # entry f·i + r
    # Shift by f//2 (the left/top replicate padding): grid[0] repeated, then grid[: f·n − f//2].
    shift = factor // 2
    if shift == 0:
        return grid
    first = grid.narrow(dim, 0, 1).expand(*grid.shape[:dim], shift, *grid.shape[dim + 1:])
    return torch.cat([first, grid.narrow(dim, 0, factor * n - shift)], dim=dim)
