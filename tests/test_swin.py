"""Swin backbone (``fastdiffinst.modeling.swin``): the official Swin-B key names and shapes
(docs/official-model.md §9.2), output geometry on odd input sizes, window attention and the shifted-window mask
against references written here from first principles, torchvision's Swin as an outside oracle,
stochastic depth, gradients, initialisation and ``torch.compile``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from fastdiffinst.modeling.swin import (
    PatchEmbed,
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    shifted_window_mask,
)
from official_keys import swin_b_keys

SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7)


def small_swin(**overrides) -> SwinTransformer:
    return SwinTransformer(**{**SMALL, **overrides})


def randomize_(module: torch.nn.Module) -> None:
    """Every float parameter random and O(1) (LayerNorm weights around 1), so that a wrong index,
    bias or norm shows up in the outputs."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0, 0.3)


# ---------------------------------------------------------------------------------------------
# Swin-B checkpoint layout (docs/official-model.md §9.2), built on the meta device
# ---------------------------------------------------------------------------------------------

def test_swin_b_state_dict_matches_spec():
    with torch.device("meta"):
        model = SwinTransformer()
    state = model.state_dict()
    expected = swin_b_keys()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected

    buffers = dict(model.named_buffers())
    assert set(buffers) == {k for k in expected if k.endswith("relative_position_index")}
    assert all(b.dtype == torch.int64 for b in buffers.values())
    parameters = dict(model.named_parameters())
    assert set(parameters) == set(expected) - set(buffers)
    assert all(p.requires_grad for p in parameters.values()), "the official Swin freezes nothing"

    count = sum(p.numel() for p in parameters.values())
    assert count == sum(math.prod(s) for k, s in expected.items() if k not in buffers)
    # Independently: torchvision's swin_b (the same architecture) has 87,768,224 parameters with its
    # classifier (1024·1000 + 1000) and final norm (2·1024) instead of norm0..norm3 (2·1920).
    assert count == 87_768_224 - 1_025_000 - 2_048 + 3_840

    assert (model.out_channels, model.out_strides, model.size_divisibility) == ([128, 256, 512, 1024],
                                                                                [4, 8, 16, 32], 32)
    shifts = [[b.shift_size for b in stage.blocks] for stage in model.layers]
    assert shifts == [[0, 3], [0, 3], [0, 3] * 9, [0, 3]]
    rates = [b.drop_path.p for stage in model.layers for b in stage.blocks]
    assert rates == torch.linspace(0, 0.3, 24).tolist()


def test_relative_position_index_buffer():
    """Row of the bias table = displacement (query - key) on a (2w-1)×(2w-1) grid, row-major."""
    window = 5
    index = SwinTransformerBlock(8, 2, window, 0).attn.relative_position_index
    assert index.dtype == torch.int64 and index.shape == (window ** 2, window ** 2)
    for i in range(window ** 2):
        for j in range(window ** 2):
            dy, dx = i // window - j // window, i % window - j % window
            assert index[i, j] == (dy + window - 1) * (2 * window - 1) + (dx + window - 1)


# ---------------------------------------------------------------------------------------------
# Output geometry
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height, width, sizes", [
    (70, 99, [(18, 25), (9, 13), (5, 7), (3, 4)]),  # patch padding, then odd sizes in every merge
    (64, 96, [(16, 24), (8, 12), (4, 6), (2, 3)]),
])
def test_output_shapes(height, width, sizes):
    model = small_swin().eval()
    outputs = model(torch.randn(2, 3, height, width))
    assert model.out_channels == [16, 32, 64, 128] and model.out_strides == [4, 8, 16, 32]
    assert [tuple(o.shape) for o in outputs] == [(2, c, h, w) for c, (h, w) in zip(model.out_channels, sizes)]
    assert all(o.is_contiguous() and torch.isfinite(o).all() for o in outputs)


def test_out_indices_subset():
    model = small_swin(out_indices=(3, 1)).eval()
    assert {k.split(".")[0] for k in model.state_dict() if k.startswith("norm")} == {"norm1", "norm3"}
    assert model.out_channels == [32, 128] and model.out_strides == [8, 32]
    full = small_swin().eval()
    full.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 40, 52)
    with torch.no_grad():
        subset, every = model(x), full(x)
    # norm0/norm2 of ``full`` keep their own init; the stages in common must agree.
    torch.testing.assert_close(subset[0], every[1], rtol=0, atol=0)
    torch.testing.assert_close(subset[1], every[3], rtol=0, atol=0)


def test_patch_embed_pads_right_bottom():
    embed = PatchEmbed(4, 3, 8, patch_norm=True).double()
    randomize_(embed)
    images = torch.randn(2, 3, 10, 13, dtype=torch.float64)
    padded = torch.zeros(2, 3, 12, 16, dtype=torch.float64)
    padded[:, :, :10, :13] = images
    expected = F.conv2d(padded, embed.proj.weight, embed.proj.bias, stride=4).permute(0, 2, 3, 1)
    expected = F.layer_norm(expected, (8,), embed.norm.weight, embed.norm.bias)
    torch.testing.assert_close(embed(images), expected, rtol=1e-12, atol=1e-12)


def test_patch_merging_order_and_odd_padding():
    merge = PatchMerging(3).double()
    randomize_(merge)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    padded = torch.zeros(2, 6, 4, 3, dtype=torch.float64)
    padded[:, :5, :3] = x
    expected = torch.empty(2, 3, 2, 12, dtype=torch.float64)
    for i in range(3):
        for j in range(2):
            r, c = 2 * i, 2 * j
            expected[:, i, j] = torch.cat([padded[:, r, c], padded[:, r + 1, c], padded[:, r, c + 1],
                                           padded[:, r + 1, c + 1]], dim=-1)
    expected = F.linear(F.layer_norm(expected, (12,), merge.norm.weight, merge.norm.bias), merge.reduction.weight)
    torch.testing.assert_close(merge(x), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Window attention and the shifted-window mask
# ---------------------------------------------------------------------------------------------

def reference_single_window_block(block: SwinTransformerBlock, x: Tensor) -> Tensor:
    """The block as plain global attention over the map zero-padded (after norm1) to one
    window: ``x [B, H, W, C]`` with H, W <= window -> ``[B, H, W, C]``."""
    batch, height, width, channels = x.shape
    window, heads = block.window_size, block.attn.num_heads
    head_dim = channels // heads
    y = x.new_zeros(batch, window, window, channels)
    y[:, :height, :width] = F.layer_norm(x, (channels,), block.norm1.weight, block.norm1.bias)
    tokens = y.reshape(batch, window * window, channels)
    qkv = tokens @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in qkv.split(channels, dim=-1))
    # The table is a (2w-1)×(2w-1) grid of displacements (query - key), offset by w - 1.
    grid = block.attn.relative_position_bias_table.view(2 * window - 1, 2 * window - 1, heads)
    rows = torch.arange(window * window) // window
    cols = torch.arange(window * window) % window
    bias = grid[rows[:, None] - rows[None, :] + window - 1, cols[:, None] - cols[None, :] + window - 1]
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias.permute(2, 0, 1)
    attended = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, window * window, channels)
    attended = attended @ block.attn.proj.weight.T + block.attn.proj.bias
    x = x + attended.view(batch, window, window, channels)[:, :height, :width]
    hidden = F.gelu(F.layer_norm(x, (channels,), block.norm2.weight, block.norm2.bias) @ block.mlp.fc1.weight.T
                    + block.mlp.fc1.bias)
    return x + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


@pytest.mark.parametrize("height, width", [(7, 7), (5, 6), (1, 3)])
def test_unshifted_block_matches_global_attention(height, width):
    block = SwinTransformerBlock(dim=12, num_heads=3, window_size=7, shift_size=0).double().eval()
    randomize_(block)
    x = torch.randn(2, height, width, 12, dtype=torch.float64)
    torch.testing.assert_close(block(x, None), reference_single_window_block(block, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window, shift, height, width", [
    (4, 2, 8, 8),    # no padding
    (4, 2, 7, 6),    # padded to 8×8
    (7, 3, 12, 13),  # padded to 14×14, odd window
    (5, 1, 9, 4),    # shift other than w // 2, padded to 10×5
    (7, 3, 5, 6),    # a map smaller than one window still shifts (the official code, unlike torchvision)
])
def test_shifted_block_mixes_exactly_the_shifted_windows(window, shift, height, width):
    """The shifted partition is the regular one displaced by ``shift``: along each axis a token
    at r belongs to window (r - shift) // w (the first ``shift`` rows form their own window).
    Perturbing one input token must change exactly the outputs of its own shifted window."""
    block = SwinTransformerBlock(dim=8, num_heads=2, window_size=window, shift_size=shift).double().eval()
    randomize_(block)
    padded_height, padded_width = -(-height // window) * window, -(-width // window) * window
    mask = shifted_window_mask(padded_height, padded_width, window, shift)
    assert mask.shape == ((padded_height // window) * (padded_width // window), window ** 2, window ** 2)

    num_tokens = height * width
    base = torch.randn(1, height, width, 8, dtype=torch.float64)
    perturbed = base.repeat(num_tokens, 1, 1, 1)  # batch element t perturbs token t
    # Not a constant vector: norm1 would remove it.
    perturbed.view(num_tokens, num_tokens, 8)[range(num_tokens), range(num_tokens)] += torch.randn(
        num_tokens, 8, dtype=torch.float64)
    with torch.no_grad():
        changed = (block(perturbed, mask) - block(base, mask)).abs().amax(-1) > 1e-9  # [t, H, W]

    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    same_window = (((rows[:, None] - shift) // window == (rows[None, :] - shift) // window)
                   & ((cols[:, None] - shift) // window == (cols[None, :] - shift) // window))
    assert torch.equal(changed.view(num_tokens, num_tokens), same_window)


# ---------------------------------------------------------------------------------------------
# Outside oracle: torchvision's Swin (same architecture; it skips the shift on maps no larger
# than a window and does not pad to the patch size, so the input avoids both cases)
# ---------------------------------------------------------------------------------------------

def to_torchvision_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    renamed = {"patch_embed.proj": "features.0.0", "patch_embed.norm": "features.0.2",
               "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    out = {}
    for key, value in state.items():
        if key.startswith("norm"):
            continue
        for ours, theirs in renamed.items():
            key = key.replace(ours, theirs)
        parts = key.split(".")
        if parts[0] == "layers":
            stage = int(parts[1])
            if parts[2] == "blocks":
                key = ".".join(["features", str(2 * stage + 1)] + parts[3:])
            else:
                key = ".".join(["features", str(2 * stage + 2)] + parts[3:])
        out[key] = value.flatten() if key.endswith("relative_position_index") else value
    return out


def test_matches_torchvision_swin():
    model = small_swin().double().eval()
    randomize_(model)
    reference = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=[7, 7],
        stochastic_depth_prob=0.0).double().eval()
    missing, unexpected = reference.load_state_dict(to_torchvision_state(model.state_dict()), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"] and not unexpected

    # 260×264: every stage map (65×66, 33×33, 17×17, 9×9) exceeds the window; odd merges.
    images = torch.randn(1, 3, 260, 264, dtype=torch.float64)
    with torch.no_grad():
        outputs = model(images)
        x = reference.features[0](images)
        for i in range(4):
            x = reference.features[2 * i + 1](x)
            expected = getattr(model, f"norm{i}")(x).permute(0, 3, 1, 2)
            torch.testing.assert_close(outputs[i], expected, rtol=1e-10, atol=1e-10)
            if i < 3:
                x = reference.features[2 * i + 2](x)


# ---------------------------------------------------------------------------------------------
# Stochastic depth, gradients, initialisation, compile
# ---------------------------------------------------------------------------------------------

def test_drop_path_only_in_training():
    model = small_swin(drop_path_rate=0.5)
    x = torch.randn(2, 3, 40, 52)
    with torch.no_grad():
        model.eval()
        first, second = model(x), model(x)
        model.train()
        train_first, train_second = model(x), model(x)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert any(not torch.equal(a, b) for a, b in zip(train_first, train_second))
    assert any(not torch.allclose(a, b) for a, b in zip(train_first, first))

    no_drop = small_swin(drop_path_rate=0.0)
    no_drop.load_state_dict(model.state_dict())
    with torch.no_grad():
        trained = no_drop.train()(x)
    for a, b in zip(trained, first):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_reach_every_parameter():
    model = small_swin(drop_path_rate=0.0).train()
    outputs = model(torch.randn(2, 3, 70, 99))
    sum((o * torch.randn_like(o)).sum() for o in outputs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_initialisation():
    model = small_swin(embed_dim=32)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 0.001
    assert all(m.bias is None or not m.bias.any() for m in linears)
    tables = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("bias_table")])
    assert abs(tables.std().item() - 0.02) < 0.002
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    # The conv keeps PyTorch's default (kaiming-uniform, bound 1/sqrt(fan_in)), far wider than 0.02.
    conv = model.patch_embed.proj.weight
    assert conv.abs().max() <= 1 / math.sqrt(48) and conv.std() > 0.05


def test_compile_fullgraph_matches_eager():
    model = small_swin().eval()
    x = torch.randn(2, 3, 70, 99)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        eager, traced = model(x), compiled(x)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
