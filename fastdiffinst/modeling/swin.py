"""Swin Transformer backbone with the semantics and parameter names of DiffusionInst's
``swintransformer.py`` (the Swin-Transformer-Object-Detection backbone; docs/official-model.md §1.2, §9.2).

Patch embedding (a patch_size-strided conv, then LayerNorm) → four stages of Swin blocks, with
patch merging (2×2 neighbourhood → LayerNorm → linear 4C → 2C) between them. A block is
pre-norm window attention with a relative position bias, then a pre-norm GELU MLP, both residual
with stochastic depth; odd blocks shift the windows by window_size // 2. Each returned stage
output has its own LayerNorm (``norm0..norm3``). Any input size works, as in the official code:
the patch embedding pads the image right/bottom to a multiple of the patch size, every block
pads its map to a multiple of the window size (and crops after), patch merging pads odd sizes.

Features run channels-last (``[B, H, W, C]``) inside the backbone; LayerNorm and Linear act on
the last dim, so this is the official ``[B, H·W, C]`` token layout with the map shape kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

# The official code masks cross-region pairs with -100, not -inf; kept so the numbers match.
MASKED_LOGIT = -100.0


def relative_position_index(window_size: int) -> Tensor:
    """Row of the relative position bias table for each (query, key) token pair of a window.

    Tokens are numbered row-major in the window. For a displacement (dy, dx) = query - key, the
    row is ``(dy + w - 1) * (2w - 1) + (dx + w - 1)``. -> ``[w², w²]`` int64.
    """
    steps = torch.arange(window_size)
    coords = torch.stack(torch.meshgrid(steps, steps, indexing="ij")).flatten(1)  # [2, w²]
    offsets = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # [2, w², w²], >= 0
    return offsets[0] * (2 * window_size - 1) + offsets[1]


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """``[B, H, W, C] -> [B·nW, w², C]`` with H, W multiples of w; windows ordered image-major,
    then row-major; tokens row-major inside a window."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def window_merge(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B·nW, w², C] -> [B, H, W, C]``."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int,
                        device: torch.device | str | None = None) -> Tensor:
    """Additive attention mask for the windows of a ``[height, width]`` map (multiples of w)
    rolled by ``-shift_size`` on both axes. -> ``[nW, w², w²]`` (default float dtype), 0 or -100.

    After the roll, the last window row (column) joins tokens from the bottom (right) and the top
    (left) border of the map. Along each axis the rolled positions fall into three regions: the
    whole windows, the last window's part from the bottom and its wrapped-around part. A token
    may attend only to tokens of its own region pair. Built from shapes with tensor ops, so it
    traces under ``torch.compile``.
    """
    def regions(length: int) -> Tensor:
        position = torch.arange(length, device=device)
        return (position >= length - window_size).long() + (position >= length - shift_size).long()

    labels = regions(height)[:, None] * 3 + regions(width)[None, :]
    labels = window_partition(labels[None, :, :, None], window_size).squeeze(-1)  # [nW, w²]
    different = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill_(different, MASKED_LOGIT)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window with a learned relative position bias
    (``[(2w-1)², heads]``, shared by all windows); qk scale ``head_dim ** -0.5``."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = window_size
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, windows: Tensor, mask: Tensor | None = None) -> Tensor:
        """``windows [B·nW, w², C]``, ``mask`` additive ``[nW, w², w²]`` or None -> ``[B·nW, w², C]``."""
        num_windows, tokens, channels = windows.shape
        q, k, v = (self.qkv(windows).view(num_windows, tokens, 3, self.num_heads, channels // self.num_heads)
                   .permute(2, 0, 3, 1, 4).unbind(0))  # each [B·nW, heads, w², head_dim]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)  # [heads, w², w²]
        if mask is not None:
            # The mask depends on the window, not on the image: repeat it over the batch.
            per_window = bias + mask[:, None]  # [nW, heads, w², w²]
            bias = per_window.expand(num_windows // mask.shape[0], -1, -1, -1, -1).reshape(
                num_windows, self.num_heads, tokens, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(num_windows, tokens, channels))


class Mlp(nn.Module):
    """``fc1 → GELU → fc2`` over the last dim."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, on ``[B, H, W, C]``; attention in
    w×w windows of the map padded to multiples of w, shifted by ``shift_size`` when > 0."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        # One sample per image and residual branch; identity in eval mode or at rate 0.
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, shift_mask: Tensor | None) -> Tensor:
        """``x [B, H, W, C]`` -> ``[B, H, W, C]``. ``shift_mask`` is :func:`shifted_window_mask`
        of the padded map size; it is read only when ``shift_size > 0``."""
        _, height, width, _ = x.shape
        window, shift = self.window_size, self.shift_size
        # Padding after norm1, as the official code does: the zero tokens join the attention
        # as keys (their key/value is the qkv bias) and are not masked.
        y = F.pad(self.norm1(x), (0, 0, 0, -width % window, 0, -height % window))
        padded_height, padded_width = y.shape[1], y.shape[2]
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = self.attn(window_partition(y, window), shift_mask if shift else None)
        y = window_merge(y, window, padded_height, padded_width)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :height, :width])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]``: each 2×2 neighbourhood concatenated,
    LayerNorm over 4C, then a bias-free linear 4C → 2C. Odd sizes are zero-padded right/bottom."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        # The official channel order (the checkpoints' reduction weights depend on it):
        # (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """``[B, in_channels, H, W] -> [B, ceil(H/p), ceil(W/p), embed_dim]``: non-overlapping p×p
    patches, the image zero-padded right/bottom to multiples of p, then LayerNorm if ``patch_norm``."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int, patch_norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        images = F.pad(images, (0, -width % self.patch_size, 0, -height % self.patch_size))
        x = self.proj(images).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class SwinStage(nn.Module):
    """``depth`` blocks at one resolution (even blocks unshifted, odd ones shifted by
    window_size // 2), then patch merging unless it is the last stage (the official ``BasicLayer``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path_rates: Sequence[float], downsample: bool) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else self.shift_size, mlp_ratio,
                                 qkv_bias, drop_path_rates[j])
            for j in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``x [B, H, W, C]`` -> (stage output ``[B, H, W, C]``, next stage's input
        ``[B, ceil(H/2), ceil(W/2), 2C]`` or None for the last stage)."""
        shift_mask = None
        if self.shift_size > 0 and len(self.blocks) > 1:
            # The official code shifts odd blocks even when the map is smaller than a window.
            height, width = x.shape[1], x.shape[2]
            padded_height = -(-height // self.window_size) * self.window_size
            padded_width = -(-width // self.window_size) * self.window_size
            shift_mask = shifted_window_mask(padded_height, padded_width, self.window_size, self.shift_size,
                                             x.device)
        for block in self.blocks:
            x = block(x, shift_mask)
        return x, self.downsample(x) if self.downsample is not None else None


def _init_weights(module: nn.Module) -> None:
    # The official ``init_weights``; the patch-embedding conv keeps PyTorch's default init.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SwinTransformer(nn.Module):
    """Swin backbone: ``forward([B, in_channels, H, W]) -> list`` of the stages in ``out_indices``,
    finest first, each ``[B, embed_dim·2^i, ceil(H/(p·2^i)), ceil(W/(p·2^i))]`` (NCHW, stride p·2^i).

    The defaults are Swin-B (``SWIN.SIZE: B-22k``): no absolute position embedding, nothing frozen,
    stochastic depth rising linearly from 0 to ``drop_path_rate`` over all blocks. State-dict keys
    are the official ones (``patch_embed.*``, ``layers.{i}.blocks.{j}.*``, ``layers.{i}.downsample.*``,
    ``norm{i}.*``).

    With ``recompute`` set (the model's fused path), training stores only each stage's input and
    recomputes the stage in the backward (the checkpoint restores the RNG state, so stochastic
    depth drops the same blocks).
    """

    size_divisibility = 32
    recompute = False

    def __init__(self, embed_dim: int = 128, depths: Sequence[int] = (2, 2, 18, 2),
                 num_heads: Sequence[int] = (4, 8, 16, 32), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.3, patch_size: int = 4, in_channels: int = 3,
                 patch_norm: bool = True, out_indices: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        if not out_indices or any(not 0 <= i < len(depths) for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} must name stages in [0, {len(depths)})")
        self.out_indices = tuple(sorted(set(out_indices)))
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim, patch_norm)
        # float32 linspace on the CPU, as the official code: the same rates, also under a meta device.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.layers = nn.ModuleList()
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            first = sum(depths[:i])
            self.layers.append(SwinStage(dim, depth, heads, window_size, mlp_ratio, qkv_bias,
                                         rates[first:first + depth], downsample=i < len(depths) - 1))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.out_channels = [dims[i] for i in self.out_indices]
        self.out_strides = [patch_size * 2 ** i for i in self.out_indices]
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.patch_embed(images)
        outputs = []
        for index, stage in enumerate(self.layers):
            if self.recompute and torch.is_grad_enabled():
                features, x = checkpoint(stage, x, use_reentrant=False)
            else:
                features, x = stage(x)
            if index in self.out_indices:
                outputs.append(getattr(self, f"norm{index}")(features).permute(0, 3, 1, 2).contiguous())
        return outputs
