"""Plain-PyTorch dynamic mask head (CondInst / DiffusionInst), the way the official code runs it:
per image, the mask features are tiled once per instance and one grouped 1×1 convolution per layer
runs (``groups = N``), with ReLU between them. The parity oracle, the fallback of
``fastdiffinst.ops.dynamic_mask_head`` and the "official formulation" baseline; differentiable
through autograd. :func:`dynamic_mask_head_bmm` is the batched-matmul formulation (a strong
baseline, not the official one).

The parameter layout is :mod:`fastdiffinst.common.mask_head`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiffinst.common.indices import check_index_range
from fastdiffinst.common.mask_head import COORD_CHANNELS, layer_shapes

# rel_coords: (inst_xy [N, 2] image coordinates, soi [N] sizes of interest, mask_stride)
RelCoords = tuple[Tensor, Tensor, int] | None


def split_params(params: Tensor, inputs: int, channels: int, num_layers: int) -> tuple[list[Tensor], list[Tensor]]:
    """``params [N, P]`` -> weights ``[N, out, in]`` and biases ``[N, out]`` per layer."""
    shapes = layer_shapes(inputs, channels, num_layers)
    sizes = [o * i for o, i in shapes] + [o for o, _ in shapes]
    chunks = torch.split(params, sizes, dim=1)
    weights = [w.reshape(-1, o, i) for w, (o, i) in zip(chunks[:num_layers], shapes)]
    return weights, list(chunks[num_layers:])


def pixel_centres(height: int, width: int, stride: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Mask-pixel centres in image coordinates, ``stride * i + stride // 2`` (AdelaiDet
    ``compute_locations``): x ``[W]`` and y ``[H]``."""
    xs = torch.arange(width, device=device, dtype=torch.int64) * stride + stride // 2
    ys = torch.arange(height, device=device, dtype=torch.int64) * stride + stride // 2
    return xs.to(dtype), ys.to(dtype)


def relative_coords(inst_xy: Tensor, soi: Tensor, height: int, width: int, stride: int,
                    dtype: torch.dtype) -> Tensor:
    """CondInst's relative coordinates ``(instance - pixel centre) / soi`` as ``[N, 2, H, W]``
    (x then y), computed in ``dtype`` (fp32, or fp64 for fp64 features)."""
    xs, ys = pixel_centres(height, width, stride, dtype, inst_xy.device)
    inst_xy, soi = inst_xy.to(dtype), soi.to(dtype)
    rx = (inst_xy[:, 0, None, None] - xs[None, None, :]) / soi[:, None, None]
    ry = (inst_xy[:, 1, None, None] - ys[None, :, None]) / soi[:, None, None]
    return torch.stack([rx.expand(-1, height, width), ry.expand(-1, height, width)], dim=1)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dynamic_mask_head(mask_feats: Tensor, params: Tensor, image_index: Tensor, *, channels: int = 8,
                      num_layers: int = 3, rel_coords: RelCoords = None, sigmoid: bool = False) -> Tensor:
    """The official formulation: per image, features tiled per instance, grouped 1×1 convs.

    Args:
        mask_feats: ``[B, C, H, W]``; params: ``[N, P]``; image_index: ``[N]`` int64.
    Returns:
        logits (or probabilities with ``sigmoid``) ``[N, H, W]`` in ``mask_feats``' dtype; fp16/bf16
        inputs are computed in fp32 and rounded once at the end, like the fused kernels.
    """
    batch, feature_channels, height, width = mask_feats.shape
    # Out-of-range indices raise, as in the C++ kernels (synchronises on CUDA).
    check_index_range("dynamic_mask_head", "image_index", image_index, 0, batch)
    dtype = mask_feats.dtype
    acc = _accumulation_dtype(dtype)
    inputs = feature_channels + (COORD_CHANNELS if rel_coords is not None else 0)
    weights, biases = split_params(params.to(acc), inputs, channels, num_layers)
    out = mask_feats.new_empty((params.shape[0], height, width), dtype=acc)
    coords = None
    if rel_coords is not None:
        inst_xy, soi, stride = rel_coords
        coords = relative_coords(inst_xy, soi, height, width, stride, acc)
    pieces = []
    for b in range(batch):
        members = (image_index == b).nonzero().flatten()
        n = members.numel()
        if n == 0 or height * width == 0:  # nothing to compute (and no convolution of an empty map)
            continue
        x = mask_feats[b].to(acc).unsqueeze(0).expand(n, -1, -1, -1)
        if coords is not None:
            x = torch.cat([coords[members], x], dim=1)
        x = x.reshape(1, n * inputs, height, width)
        for layer in range(num_layers):
            w = weights[layer][members]
            out_ch, in_ch = w.shape[1], w.shape[2]
            x = F.conv2d(x, w.reshape(n * out_ch, in_ch, 1, 1), biases[layer][members].reshape(-1), groups=n)
            if layer < num_layers - 1:
                x = F.relu(x)
        pieces.append((members, x.reshape(n, height, width)))
    if pieces:
        # Under autocast the convolutions ran in its dtype (as the official code's would): widened here.
        out = out.index_put((torch.cat([m for m, _ in pieces]),), torch.cat([x for _, x in pieces]).to(acc))
    else:
        # No instances (or no pixels): zeros that stay in the graph, so gradients come back as zeros.
        out = out.zero_() + 0.0 * (mask_feats.sum() + params.sum()).to(acc)
    if sigmoid:
        out = out.sigmoid()
    return out.to(dtype)


def dynamic_mask_head_bmm(mask_feats: Tensor, params: Tensor, image_index: Tensor, *, channels: int = 8,
                          num_layers: int = 3, rel_coords: RelCoords = None) -> Tensor:
    """Batched-matmul formulation: gathers every instance's input ``[N, C', H·W]`` and runs
    ``baddbmm`` per layer. Returns logits ``[N, H, W]`` (in ``mask_feats``' dtype)."""
    batch, feature_channels, height, width = mask_feats.shape
    check_index_range("dynamic_mask_head", "image_index", image_index, 0, batch)
    acc = _accumulation_dtype(mask_feats.dtype)
    inputs = feature_channels + (COORD_CHANNELS if rel_coords is not None else 0)
    weights, biases = split_params(params.to(acc), inputs, channels, num_layers)
    x = mask_feats.to(acc).flatten(2)[image_index]
    if rel_coords is not None:
        inst_xy, soi, stride = rel_coords
        x = torch.cat([relative_coords(inst_xy, soi, height, width, stride, acc).flatten(2), x], dim=1)
    for layer in range(num_layers):
        x = torch.baddbmm(biases[layer].unsqueeze(2), weights[layer], x)
        if layer < num_layers - 1:
            x = F.relu(x)
    return x.reshape(-1, height, width).to(mask_feats.dtype)


def dice_sums(probs: Tensor, gt_masks: Tensor, gt_index: Tensor) -> Tensor:
    """``[N, 3]`` = (Σ p·g, Σ p², Σ g²) per instance, with ``g = gt_masks[gt_index] != 0`` as 0/1
    and ``g = 0`` where ``gt_index == -1``; fp32 (fp64 for fp64 ``probs``)."""
    check_index_range("dynamic_mask_dice_sums", "gt_index", gt_index, -1, gt_masks.shape[0], " (-1 = no target)")
    acc = _accumulation_dtype(probs.dtype)
    p = probs.to(acc).flatten(1)
    g = (gt_masks[gt_index.clamp(min=0)] != 0).to(acc).flatten(1) * (gt_index >= 0).to(acc)[:, None]
    return torch.stack([(p * g).sum(1), (p * p).sum(1), (g * g).sum(1)], dim=1)


def dynamic_mask_dice_sums(mask_feats: Tensor, params: Tensor, image_index: Tensor, gt_masks: Tensor,
                           gt_index: Tensor, *, channels: int = 8, num_layers: int = 3,
                           rel_coords: RelCoords = None) -> Tensor:
    """Unfused dice sums: :func:`dynamic_mask_head` → sigmoid → :func:`dice_sums`."""
    probs = dynamic_mask_head(mask_feats, params, image_index, channels=channels, num_layers=num_layers,
                              rel_coords=rel_coords, sigmoid=True)
    return dice_sums(probs, gt_masks, gt_index)
