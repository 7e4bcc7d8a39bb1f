"""Plain-PyTorch RoIAlign with the exact semantics of ``torchvision.ops.roi_align`` and detectron2's
multi-level ``ROIPooler`` (per-level loop): the parity oracle and the fallback of
``fastdiffinst.ops.roi_align`` / ``multilevel_roi_align``, and the per-level loop of the model's
official pooler (``fastdiffinst.modeling.poolers``, on torchvision's RoIAlign). Differentiable
through autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastdiffinst import _extension
from fastdiffinst.common.levels import assign_fpn_levels, level_range

# (input, rois [K, 5], output_size, spatial_scale, sampling_ratio, aligned) -> [K, C, PH, PW]
RoIAlignFn = Callable[[Tensor, Tensor, tuple[int, int], float, int, bool], Tensor]

# Bounds the gathered [rois, samples_y, samples_x, C] tensor of one chunk (elements).
_CHUNK_ELEMENTS = 1 << 24
# The adaptive grid's cap of the native kernels (roi::kMaxAdaptiveGrid, exported by fastdiffinst._C).
_MAX_ADAPTIVE_GRID = _extension.limit("MAX_SAMPLING_RATIO")


def _axis_taps(coords: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Bilinear neighbours along one axis of sample coordinates ``coords`` (any shape).

    Returns (valid, lo, hi, w_lo, w_hi); torchvision: samples outside [-1, size] are empty,
    coordinates are clamped to [0, size - 1].
    """
    valid = (coords >= -1.0) & (coords <= size)
    v = coords.clamp(min=0.0)
    lo = torch.nan_to_num(v.floor(), nan=0.0).clamp(0, size - 1).to(torch.int64)
    at_edge = lo >= size - 1
    hi = torch.where(at_edge, lo, lo + 1)
    v = torch.where(at_edge, lo.to(v.dtype), v)
    frac = v - lo.to(v.dtype)
    return valid, lo, hi, 1.0 - frac, frac


def _roi_align_chunk(feats: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float,
                     sampling_ratio: int, aligned: bool, coord_dtype: torch.dtype) -> Tensor:
    """RoIAlign of one chunk of RoIs: feats [B, C, H, W], rois [k, 5] -> [k, C, PH, PW]."""
    _, channels, height, width = feats.shape
    r = rois.to(coord_dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1 = r[:, 1] * spatial_scale - offset, r[:, 2] * spatial_scale - offset
    roi_w, roi_h = r[:, 3] * spatial_scale - offset - x1, r[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio)
        grid_w = torch.full_like(roi_w, sampling_ratio)
    else:
        grid_h = torch.ceil(roi_h / pooled_h).clamp(0, _MAX_ADAPTIVE_GRID)
        grid_w = torch.ceil(roi_w / pooled_w).clamp(0, _MAX_ADAPTIVE_GRID)
    count = (grid_h * grid_w).clamp(min=1.0)
    max_gh = max(int(grid_h.max()), 1) if sampling_ratio <= 0 else sampling_ratio
    max_gw = max(int(grid_w.max()), 1) if sampling_ratio <= 0 else sampling_ratio

    def samples(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, max_grid: int) -> tuple[Tensor, Tensor]:
        p = torch.arange(pooled, dtype=coord_dtype, device=feats.device)
        i = torch.arange(max_grid, dtype=coord_dtype, device=feats.device)
        g = grid[:, None, None].clamp(min=1.0)
        coords = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
                  + (i[None, None, :] + 0.5) * bin_size[:, None, None] / g)
        return coords, i[None, None, :] < grid[:, None, None]  # [k, pooled, max_grid]

    ys, in_grid_y = samples(y1, bin_h, grid_h, pooled_h, max_gh)
    xs, in_grid_x = samples(x1, bin_w, grid_w, pooled_w, max_gw)
    vy, ylo, yhi, wylo, wyhi = _axis_taps(ys, height)
    vx, xlo, xhi, wxlo, wxhi = _axis_taps(xs, width)
    my, mx = vy & in_grid_y, vx & in_grid_x
    k = rois.shape[0]
    batch = r[:, 0].to(torch.int64)
    flat = feats.flatten(2)  # [B, C, H*W]
    acc_dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
    out = feats.new_zeros((k, pooled_h, max_gh, pooled_w, max_gw, channels), dtype=acc_dtype)
    for yi, wy in ((ylo, wylo), (yhi, wyhi)):
        for xi, wx in ((xlo, wxlo), (xhi, wxhi)):
            index = yi.reshape(k, -1, 1) * width + xi.reshape(k, 1, -1)  # [k, PH*GH, PW*GW]
            values = flat[batch[:, None, None], :, index].to(acc_dtype)  # [k, PH*GH, PW*GW, C]
            weight = torch.where(my, wy, 0.0).reshape(k, -1, 1) * torch.where(mx, wx, 0.0).reshape(k, 1, -1)
            out = out + (weight.to(acc_dtype)[..., None] * values).reshape(out.shape)
    pooled = out.sum(dim=(2, 4)) / count.to(acc_dtype)[:, None, None, None]  # [k, PH, PW, C]
    return pooled.permute(0, 3, 1, 2).to(feats.dtype)


def roi_align(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign (torchvision semantics). input [B, C, H, W]; rois [K, 5] (batch index, x1, y1, x2, y2)
    in input-image coordinates -> [K, C, PH, PW] in input's dtype, accumulated in fp32 (fp64 for fp64).
    """
    pooled_h, pooled_w = output_size
    coord_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    k = rois.shape[0]
    if k == 0:
        # An empty slice of the input keeps the autograd graph (zero gradients) without any work.
        return input.reshape(-1)[:0].reshape(0, input.shape[1], pooled_h, pooled_w)
    if sampling_ratio > 0:
        grid = sampling_ratio
    else:
        # The adaptive grid of the largest RoI bounds the gathered samples per RoI.
        extent = (rois[:, 3:5] - rois[:, 1:3]).abs().max().item() * spatial_scale + 1.0
        grid = min(_MAX_ADAPTIVE_GRID, max(1, math.ceil(extent / min(pooled_h, pooled_w))))
    per_roi = input.shape[1] * pooled_h * pooled_w * grid**2
    step = max(1, _CHUNK_ELEMENTS // max(per_roi, 1))
    chunks = [
        _roi_align_chunk(input, rois[i:i + step], pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
                         coord_dtype)
        for i in range(0, k, step)
    ]
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def multilevel_roi_align(features: Sequence[Tensor], rois: Tensor, output_size: tuple[int, int],
                         spatial_scales: Sequence[float], sampling_ratio: int, aligned: bool,
                         canonical_box_size: int = 224, canonical_level: int = 4, *,
                         roi_align: RoIAlignFn = roi_align) -> Tensor:
    """detectron2 ``ROIPooler`` as the official code runs it: assign each RoI a level, then one
    ``roi_align`` per level on its subset and a scatter back into box order; a RoI of no level (a
    NaN level: one reversed side) keeps a zero row. One level is one ``roi_align`` of every RoI, as
    in detectron2. ``roi_align`` is this module's by default; the model's official pooler passes
    torchvision's. -> [K, C, PH, PW]."""
    min_level, max_level = level_range(spatial_scales)
    pooled_h, pooled_w = output_size
    if len(features) == 1:
        return roi_align(features[0], rois, output_size, spatial_scales[0], sampling_ratio, aligned)
    levels = assign_fpn_levels(rois[:, 1:], min_level, max_level, canonical_box_size, canonical_level)
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], pooled_h, pooled_w))
    for level, (feats, scale) in enumerate(zip(features, spatial_scales)):
        index = torch.nonzero(levels == level).squeeze(1)
        out = out.index_put((index,), roi_align(feats, rois[index], output_size, scale, sampling_ratio, aligned))
    return out


__all__ = ["roi_align", "multilevel_roi_align"]
