"""``dynamic_mask_head`` and ``dynamic_mask_dice_sums``, once per backend (the C++ kernels, and the
Triton kernels through the interpreter on CPU / compiled on CUDA): parity with the official
grouped-convolution formulation and a float64 einsum, gradients against autograd through the
reference, dice sums against the unfused dice, the op contract of each (opcheck, torch.compile,
unwritten outputs, empty inputs, gradcheck: tests/op_contract.py), fp16/bf16, determinism and bad
input (docs/design.md §2.1, §6)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastdiffinst.ops as fops
from fastdiffinst.ops import dice_loss_from_sums
from fastdiffinst.reference import dynamic_mask_head as ref
from op_contract import DifferentiableOpContract
from utils import assert_close_to_f64, runs_at_two_thread_counts, tolerance

# On a GPU machine the Triton kernels are tested compiled, on CUDA tensors (the cuda-marked tests);
# on CPU tensors they run through the interpreter, which conftest turns on only without a GPU.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ("cpp", pytest.param("triton", marks=pytest.mark.skipif(
    not _INTERPRETING, reason="Triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1)")))
# (in_channels, channels, num_layers, rel_coords): DiffusionInst, CondInst, and generic heads.
HEADS = [(8, 8, 3, False), (8, 8, 3, True), (5, 4, 1, False), (5, 4, 1, True), (3, 6, 2, True), (7, 5, 4, False)]
HEAD_IDS = ["diffusioninst", "condinst", "L1", "L1-coords", "L2-coords", "L4"]


def _case(in_channels=8, channels=8, num_layers=3, coords=False, batch=2, n=7, height=13, width=17,
          dtype=torch.float32, device="cpu", seed=0):
    """Random inputs: features, filters scaled so that the ReLUs are half active, image indices
    (image 1 of 3 without instances when batch > 2), CondInst coordinates."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, in_channels, height, width, generator=g, dtype=torch.float64)
    p = fops.dynamic_mask_head_num_params(in_channels, channels, num_layers, coords)
    params = torch.randn(n, p, generator=g, dtype=torch.float64) * 0.6
    images = [b for b in range(batch) if not (batch > 2 and b == 1)]
    image_index = torch.tensor(images, dtype=torch.int64)[torch.randint(0, len(images), (n,), generator=g)]
    rel = None
    if coords:
        stride = 8
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([width * stride, height * stride])
        soi = torch.tensor([64.0, 128.0, 256.0, 512.0, 1024.0], dtype=torch.float64)[
            torch.randint(0, 5, (n,), generator=g)]
        rel = (xy.to(device), soi.to(device), stride)
    return feats.to(device, dtype), params.to(device, dtype), image_index.to(device), rel


def _einsum_f64(feats, params, image_index, channels, num_layers, rel):
    """An independent float64 evaluation: per-pixel MLP through einsum."""
    feats, params = feats.double(), params.double()
    b, c, h, w = feats.shape
    x = feats[image_index]
    if rel is not None:
        xs = torch.arange(w, dtype=torch.float64, device=feats.device) * rel[2] + rel[2] // 2
        ys = torch.arange(h, dtype=torch.float64, device=feats.device) * rel[2] + rel[2] // 2
        xy, soi = rel[0].double(), rel[1].double()
        rx = ((xy[:, 0, None, None] - xs[None, None, :]) / soi[:, None, None]).expand(-1, h, w)
        ry = ((xy[:, 1, None, None] - ys[None, :, None]) / soi[:, None, None]).expand(-1, h, w)
        x = torch.cat([rx[:, None], ry[:, None], x], dim=1)
    inputs = x.shape[1]
    offset, weights = 0, []
    for layer in range(num_layers):
        fan_in = inputs if layer == 0 else channels
        fan_out = 1 if layer == num_layers - 1 else channels
        weights.append(params[:, offset:offset + fan_in * fan_out].reshape(-1, fan_out, fan_in))
        offset += fan_in * fan_out
    for layer in range(num_layers):
        fan_out = 1 if layer == num_layers - 1 else channels
        bias = params[:, offset:offset + fan_out]
        offset += fan_out
        x = torch.einsum("noi,nihw->nohw", weights[layer], x) + bias[:, :, None, None]
        if layer < num_layers - 1:
            x = x.clamp(min=0)
    return x[:, 0]


def _run(backend, fn, *args, **kwargs):
    with fops.use_backend("dynamic_mask_head", backend):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Forward parity

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_forward_matches_grouped_conv_and_einsum(backend, head):
    in_channels, channels, num_layers, coords = head
    feats, params, image_index, rel = _case(in_channels, channels, num_layers, coords, batch=3, dtype=torch.float64)
    out = _run(backend, fops.dynamic_mask_head, feats, params, image_index, channels=channels, num_layers=num_layers,
               rel_coords=rel)
    grouped = ref.dynamic_mask_head(feats, params, image_index, channels=channels, num_layers=num_layers,
                                    rel_coords=rel)
    torch.testing.assert_close(out, grouped, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, _einsum_f64(feats, params, image_index, channels, num_layers, rel),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coords", [False, True])
def test_forward_fp32_and_sigmoid(backend, coords):
    feats, params, image_index, rel = _case(coords=coords, n=9, height=11, width=23)
    expected = _einsum_f64(feats, params, image_index, 8, 3, rel)
    logits = _run(backend, fops.dynamic_mask_head, feats, params, image_index, rel_coords=rel)
    probs = _run(backend, fops.dynamic_mask_head, feats, params, image_index, rel_coords=rel, sigmoid=True)
    assert logits.dtype == probs.dtype == torch.float32 and logits.shape == (9, 11, 23)
    assert_close_to_f64(logits, expected, reduce_len=8)
    assert_close_to_f64(probs, expected.sigmoid(), reduce_len=8)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_over_the_whole_fp32_range(backend):
    """The fused sigmoid (a vectorised exp on CPU) against float64 rounded to fp32, logits from -120
    to 120, subnormal probabilities included: a one-layer head with weight 1 and bias 0 passes the
    feature through."""
    x = torch.linspace(-120.0, 120.0, 89 * 97).reshape(1, 1, 89, 97)
    params = torch.tensor([[1.0, 0.0]])
    probs = _run(backend, fops.dynamic_mask_head, x, params, torch.zeros(1, dtype=torch.int64), channels=1,
                 num_layers=1, sigmoid=True)
    expected = x[0, 0].double().sigmoid().float()
    assert (expected.flatten()[:5] == 0).all() and (expected > 0).any() and (expected < 1e-38).sum() > 100
    # atol: 2 steps of the smallest subnormal, where the relative precision of fp32 runs out.
    torch.testing.assert_close(probs[0], expected, rtol=3e-7, atol=3e-45)


def test_official_formulation_equals_bmm_formulation():
    """The two baselines agree (the bmm one is the strong baseline of the benchmark)."""
    for coords in (False, True):
        feats, params, image_index, rel = _case(coords=coords, dtype=torch.float64)
        torch.testing.assert_close(ref.dynamic_mask_head_bmm(feats, params, image_index, rel_coords=rel),
                                   ref.dynamic_mask_head(feats, params, image_index, rel_coords=rel))


def test_reference_runs_like_the_official_grouped_conv():
    """Our reference is the official evaluation: features tiled per instance and three grouped
    convolutions (spelled out here the way DiffusionInst's ``mask_heads_forward`` runs them)."""
    feats, params, _, _ = _case(batch=1, n=5, dtype=torch.float64)
    n = params.shape[0]
    w0, w1, w2, b0, b1, b2 = torch.split(params, [64, 64, 8, 8, 8, 1], dim=1)
    x = feats.repeat(1, n, 1, 1)
    x = F.relu(F.conv2d(x, w0.reshape(n * 8, 8, 1, 1), b0.reshape(-1), groups=n))
    x = F.relu(F.conv2d(x, w1.reshape(n * 8, 8, 1, 1), b1.reshape(-1), groups=n))
    x = F.conv2d(x, w2.reshape(n, 8, 1, 1), b2.reshape(-1), groups=n)
    got = ref.dynamic_mask_head(feats, params, torch.zeros(n, dtype=torch.int64))
    torch.testing.assert_close(got, x[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    feats, params, image_index, rel = _case(coords=True)
    expected = _run(backend, fops.dynamic_mask_head, feats, params, image_index, rel_coords=rel)
    feats_cl = feats.to(memory_format=torch.channels_last)
    params_t = params.t().contiguous().t()
    assert not feats_cl.is_contiguous() and not params_t.is_contiguous()
    xy = torch.stack([rel[0][:, 0], rel[0][:, 1]], dim=0).t()  # [N, 2], transposed storage
    index_strided = torch.stack([image_index, image_index + 7], dim=1)[:, 0]
    assert not index_strided.is_contiguous()
    got = _run(backend, fops.dynamic_mask_head, feats_cl, params_t, index_strided, rel_coords=(xy, rel[1], rel[2]))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    gt, gt_index = _targets(params.shape[0], feats.shape[2], feats.shape[3])
    gt_index_strided = torch.stack([gt_index, gt_index], dim=1)[:, 1]
    expected = _run(backend, fops.dynamic_mask_dice_sums, feats, params, image_index, gt, gt_index, rel_coords=rel)
    got = _run(backend, fops.dynamic_mask_dice_sums, feats_cl, params_t, index_strided, gt[:, :, :], gt_index_strided,
               rel_coords=(xy, rel[1], rel[2]))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # One image for every instance, as an expanded (stride-0) index.
    shared = torch.zeros((), dtype=torch.int64).expand(params.shape[0])
    torch.testing.assert_close(_run(backend, fops.dynamic_mask_head, feats, params, shared, rel_coords=rel),
                               _run(backend, fops.dynamic_mask_head, feats, params, shared.contiguous(),
                                    rel_coords=rel), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(backend, dtype):
    feats, params, image_index, rel = _case(coords=True, dtype=dtype)
    out = _run(backend, fops.dynamic_mask_head, feats, params, image_index, rel_coords=rel)
    assert out.dtype == dtype
    expected = _einsum_f64(feats, params, image_index, 8, 3, rel)  # on the rounded inputs
    torch.testing.assert_close(out.double(), expected, **tolerance(dtype, 8))
    feats.requires_grad_(True)
    params.requires_grad_(True)
    out = _run(backend, fops.dynamic_mask_head, feats, params, image_index, rel_coords=rel)
    upstream = torch.randn(out.shape).to(dtype)
    out.backward(upstream)
    assert feats.grad.dtype == dtype and params.grad.dtype == dtype
    f64, p64 = feats.detach().double().requires_grad_(), params.detach().double().requires_grad_()
    _einsum_f64(f64, p64, image_index, 8, 3, rel).backward(upstream.double())
    torch.testing.assert_close(feats.grad.double(), f64.grad, **tolerance(dtype, 64))
    scale = p64.grad.abs().max()
    torch.testing.assert_close(params.grad.double() / scale, p64.grad / scale, **tolerance(dtype, 64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_in_low_precision(backend):
    feats, params, image_index, _ = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(backend, fops.dynamic_mask_head, feats, params.half(), image_index)
        out64 = _run(backend, fops.dynamic_mask_head, feats, params.double(), image_index)
    assert out.dtype == torch.bfloat16 and out64.dtype == torch.float64  # fp64 is never cast down
    expected = _einsum_f64(feats.bfloat16(), params.half().bfloat16(), image_index, 8, 3, None)
    torch.testing.assert_close(out.double(), expected, **tolerance(torch.bfloat16, 8))
    torch.testing.assert_close(out64, _einsum_f64(feats, params.double(), image_index, 8, 3, None))


# --------------------------------------------------------------------------------------------
# Gradients

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("sigmoid", [False, True])
def test_backward_matches_autograd_reference(backend, head, sigmoid):
    in_channels, channels, num_layers, coords = head
    feats, params, image_index, rel = _case(in_channels, channels, num_layers, coords, batch=3)
    grad = torch.randn(params.shape[0], feats.shape[2], feats.shape[3])
    f, p = feats.clone().requires_grad_(), params.clone().requires_grad_()
    _run(backend, fops.dynamic_mask_head, f, p, image_index, channels=channels, num_layers=num_layers,
         rel_coords=rel, sigmoid=sigmoid).backward(grad)
    f64, p64 = feats.double().requires_grad_(), params.double().requires_grad_()
    out64 = ref.dynamic_mask_head(f64, p64, image_index, channels=channels, num_layers=num_layers, rel_coords=rel,
                                  sigmoid=sigmoid)
    out64.backward(grad.double())
    hw = feats.shape[2] * feats.shape[3]
    assert_close_to_f64(f.grad, f64.grad, reduce_len=params.shape[0] * channels, msg="grad mask_feats")
    assert_close_to_f64(p.grad, p64.grad, reduce_len=hw, msg="grad params")
    assert f.grad[1].abs().sum() == 0  # image 1 has no instances


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_spanning_several_chunks(backend, deterministic, monkeypatch):
    """Maps of several chunks (the reductions' units of work): per-chunk partial sums and chunk
    offsets of the feature gradient. 23×97 = 2231 pixels are 2 chunks of the C++ kernels (2048
    pixels) and, with 4-tile chunks, 5 of the Triton kernels."""
    from fastdiffinst.kernels import dynamic_mask_head as kernels

    monkeypatch.setattr(kernels, "_CHUNK_TILES", 4)
    feats, params, image_index, rel = _case(coords=True, batch=2, n=3, height=23, width=97)
    gt, gt_index = _targets(3, 23, 97)
    torch.use_deterministic_algorithms(deterministic)
    f, p = feats.clone().requires_grad_(), params.clone().requires_grad_()
    out = _run(backend, fops.dynamic_mask_head, f, p, image_index, rel_coords=rel)
    sums = _run(backend, fops.dynamic_mask_dice_sums, f, p, image_index, gt, gt_index, rel_coords=rel)
    grad = torch.randn_like(out)
    ((out * grad).sum() + sums.sum()).backward()
    f64, p64 = feats.double().requires_grad_(), params.double().requires_grad_()
    logits64 = _einsum_f64(f64, p64, image_index, 8, 3, rel)
    sums64 = ref.dice_sums(logits64.sigmoid(), gt, gt_index)
    ((logits64 * grad.double()).sum() + sums64.sum()).backward()
    assert_close_to_f64(out, logits64.detach(), reduce_len=8)
    assert_close_to_f64(sums, sums64.detach(), reduce_len=23 * 97)
    assert_close_to_f64(f.grad, f64.grad, reduce_len=3 * 8)
    assert_close_to_f64(p.grad, p64.grad, reduce_len=23 * 97)


def test_reference_rejects_out_of_range_indices():
    feats, params, _, _ = _case()
    with fops.use_backend("dynamic_mask_head", "reference"):
        with pytest.raises(RuntimeError, match=r"image_index\[1\] = 2 is out of range \[0, 2\)"):
            fops.dynamic_mask_head(feats, params, torch.tensor([0, 2, 0, 0, 0, 0, 0]))
        gt, _ = _targets(7, 13, 17)
        with pytest.raises(RuntimeError, match=r"gt_index\[0\] = 4 is out of range \[-1, 4\)"):
            fops.dynamic_mask_dice_sums(feats, params, torch.zeros(7, dtype=torch.int64), gt,
                                        torch.tensor([4, 0, 0, 0, 0, 0, 0]))


# --------------------------------------------------------------------------------------------
# Dice sums

def _targets(n, height, width, count=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    gt = (torch.rand(count, height, width, generator=g) > 0.6).to(torch.uint8)
    gt[0] *= 3  # any nonzero value is foreground
    gt_index = torch.randint(-1, count, (n,), generator=g)
    gt_index[0] = -1
    return gt, gt_index


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coords", [False, True])
def test_dice_sums_match_unfused_dice(backend, coords):
    feats, params, image_index, rel = _case(coords=coords, batch=3, n=9)
    gt, gt_index = _targets(9, feats.shape[2], feats.shape[3])
    f, p = feats.clone().requires_grad_(), params.clone().requires_grad_()
    sums = _run(backend, fops.dynamic_mask_dice_sums, f, p, image_index, gt, gt_index, rel_coords=rel)
    assert sums.shape == (9, 3) and sums.dtype == torch.float32
    f64, p64 = feats.double().requires_grad_(), params.double().requires_grad_()
    sums64 = ref.dice_sums(_einsum_f64(f64, p64, image_index, 8, 3, rel).sigmoid(), gt, gt_index)
    hw = feats.shape[2] * feats.shape[3]
    assert_close_to_f64(sums, sums64.detach(), reduce_len=hw)
    assert sums[0, 0] == 0 and sums[0, 2] == 0  # no target
    # The dice loss of training, through the fused sums and through the unfused probabilities.
    weights = torch.rand(9, dtype=torch.float64)
    (dice_loss_from_sums(sums.double()) * weights).sum().backward()
    (dice_loss_from_sums(sums64) * weights).sum().backward()
    assert_close_to_f64(f.grad, f64.grad, reduce_len=72)
    assert_close_to_f64(p.grad, p64.grad, reduce_len=hw)


# --------------------------------------------------------------------------------------------
# The op contracts: opcheck, torch.compile, unwritten outputs, empty inputs, gradcheck

class _MaskHeadContract(DifferentiableOpContract):
    """What the contracts of the two functions share: both backends (``use_backend("dynamic_mask_head",
    ...)`` covers both), gradients for ``mask_feats`` and ``params``, no double backward."""

    op = "dynamic_mask_head"
    backends = BACKENDS
    grad_inputs = (0, 1)
    compile_variants = ("condinst",)
    test_gradgradcheck = None  # the backward ops have no autograd of their own
    CHANNELS = 4  # the position of ``channels`` in the inputs

    def gradcheck_fast_mode(self, backend):
        return backend == "triton"

    def grad_reduce_lens(self, inputs):
        feats, params, channels = inputs[0], inputs[1], inputs[self.CHANNELS]
        return [params.shape[0] * channels, feats.shape[2] * feats.shape[3]]

    @staticmethod
    def condinst_case(variant):
        """CondInst heads: "condinst" 13x17, "condinst, 19x23" 3 images of 437 px (a partial tile)."""
        return _case(coords=True) if variant == "condinst" else _case(coords=True, batch=3, height=19, width=23)

    @staticmethod
    def native(name, backend):
        """The registered op ``name`` ("{}" marks where the Triton ops have "_triton") of ``backend``."""
        return getattr(torch.ops.fastdiffinst, name.format("_triton" if backend == "triton" else ""))


class TestDynamicMaskHeadContract(_MaskHeadContract):
    """tests/op_contract.py on ``dynamic_mask_head`` against the grouped-convolution reference."""

    variants = ("condinst, 19x23",)
    empty_variants = ("no instances", "empty mask map")
    gradcheck_cases = ("no coords", "coords")

    def make_inputs(self, variant):
        feats, params, image_index, rel = self.condinst_case(variant)
        return feats, params, image_index, rel, 8, 3, False

    def make_empty_inputs(self, variant):
        if variant == "no instances":
            return torch.randn(2, 8, 5, 6), torch.randn(0, 153), torch.zeros(0, dtype=torch.int64), None, 8, 3, False
        return torch.randn(1, 8, 0, 6), torch.randn(3, 153), torch.zeros(3, dtype=torch.int64), None, 8, 3, False

    def make_gradcheck_inputs(self, case):
        feats, params, image_index, rel = _case(4, 3, 3, case == "coords", batch=2, n=3, height=5, width=7,
                                                dtype=torch.float64)
        return feats, params, image_index, rel, 3, 3, True

    def call(self, mask_feats, params, image_index, rel_coords, channels, num_layers, sigmoid):
        return fops.dynamic_mask_head(mask_feats, params, image_index, channels=channels, num_layers=num_layers,
                                      rel_coords=rel_coords, sigmoid=sigmoid)

    def reference(self, mask_feats, params, image_index, rel_coords, channels, num_layers, sigmoid):
        return ref.dynamic_mask_head(mask_feats, params, image_index, channels=channels, num_layers=num_layers,
                                     rel_coords=rel_coords, sigmoid=sigmoid)

    def output_reduce_len(self, inputs):
        return inputs[self.CHANNELS]

    def opcheck_cases(self, backend, requires_grad):
        feats, params, image_index, _ = _case(n=5, height=7, width=9)
        cases = [(self.native("dynamic_mask_head{}", backend),
                  (feats.requires_grad_(requires_grad), params.requires_grad_(requires_grad), image_index, None, None,
                   4, 8, 3, True))]
        if not requires_grad:
            feats, params, image_index, (xy, soi, stride) = _case(coords=True, n=5, height=7, width=9)
            cases.append((self.native("_dynamic_mask_head{}_backward", backend),
                          (torch.randn(5, 7, 9), feats, params, image_index, xy, soi, stride, 8, 3, False)))
        return cases


class TestDiceSumsContract(_MaskHeadContract):
    """tests/op_contract.py on ``dynamic_mask_dice_sums`` against the unfused reference (head,
    sigmoid, dice sums)."""

    variants = ("condinst, 19x23",)
    empty_variants = ("no instances",)
    gradcheck_cases = ("2 layers",)
    CHANNELS = 6

    def make_inputs(self, variant):
        feats, params, image_index, rel = self.condinst_case(variant)
        gt, gt_index = _targets(params.shape[0], feats.shape[2], feats.shape[3])
        return feats, params, image_index, gt, gt_index, rel, 8, 3

    def make_empty_inputs(self, variant):
        index = torch.zeros(0, dtype=torch.int64)
        return (torch.randn(2, 8, 5, 6), torch.randn(0, 153), index, torch.zeros(1, 5, 6, dtype=torch.uint8), index,
                None, 8, 3)

    def make_gradcheck_inputs(self, case):
        feats, params, image_index, _ = _case(3, 4, 2, False, n=4, height=5, width=6, dtype=torch.float64)
        gt, gt_index = _targets(4, 5, 6)
        return feats, params, image_index, gt, gt_index, None, 4, 2

    def call(self, mask_feats, params, image_index, gt_masks, gt_index, rel_coords, channels, num_layers):
        return fops.dynamic_mask_dice_sums(mask_feats, params, image_index, gt_masks, gt_index, channels=channels,
                                           num_layers=num_layers, rel_coords=rel_coords)

    def reference(self, mask_feats, params, image_index, gt_masks, gt_index, rel_coords, channels, num_layers):
        return ref.dynamic_mask_dice_sums(mask_feats, params, image_index, gt_masks, gt_index, channels=channels,
                                          num_layers=num_layers, rel_coords=rel_coords)

    def output_reduce_len(self, inputs):
        return inputs[0].shape[2] * inputs[0].shape[3]

    def opcheck_cases(self, backend, requires_grad):
        feats, params, image_index, (xy, soi, stride) = _case(coords=True, n=5, height=7, width=9)
        gt, gt_index = _targets(5, 7, 9)
        cases = [(self.native("dynamic_mask_dice_sums{}", backend),
                  (feats.requires_grad_(requires_grad), params.requires_grad_(requires_grad), image_index, gt,
                   gt_index, xy, soi, stride, 8, 3))]
        if not requires_grad:
            cases.append((self.native("_dynamic_mask_dice_sums{}_backward", backend),
                          (torch.randn(5, 3), feats, params, image_index, gt, gt_index, xy, soi, stride, 8, 3)))
        return cases


# --------------------------------------------------------------------------------------------
# torch.compile: both ops in one graph, and inductor

def _assert_compiled_matches_eager(fn, feats, params, backend):
    """Loss and both gradients of ``fn(feats, params)``, eager and ``torch.compile(fullgraph=True)``."""
    results = []
    for compiled in (False, True):
        f, p = feats.clone().requires_grad_(), params.clone().requires_grad_()
        run = torch.compile(fn, fullgraph=True, backend=backend) if compiled else fn
        loss = run(f, p)
        loss.backward()
        results.append((loss.detach(), f.grad, p.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_head_and_dice_sums_in_one_graph(backend):
    """Both ops and the dice loss in one ``fullgraph`` aot_eager graph (the contracts compile each op
    alone), forward and backward."""
    feats, params, image_index, rel = _case(coords=True)
    gt, gt_index = _targets(params.shape[0], feats.shape[2], feats.shape[3])

    def fn(f, p):
        logits = fops.dynamic_mask_head(f * 1.5, p, image_index, rel_coords=rel)
        sums = fops.dynamic_mask_dice_sums(f, p, image_index, gt, gt_index, rel_coords=rel)
        return logits.sigmoid().mean() + dice_loss_from_sums(sums).sum()

    torch._dynamo.reset()
    with fops.use_backend("dynamic_mask_head", backend):
        _assert_compiled_matches_eager(fn, feats, params, "aot_eager")


def test_compile_inductor_matches_eager():
    """The one inductor run of the mask-head tests (C++ backend, forward and backward)."""
    feats, params, image_index, _ = _case()

    def fn(f, p):
        return (fops.dynamic_mask_head(f + 0.5, p, image_index, sigmoid=True) * 2).sum()

    torch._dynamo.reset()
    _assert_compiled_matches_eager(fn, feats, params, "inductor")


# --------------------------------------------------------------------------------------------
# Determinism, empty inputs

@pytest.mark.skipif(not _INTERPRETING, reason="Triton on CPU tensors needs the interpreter")
def test_cpp_results_do_not_depend_on_the_thread_count():
    """Fixed 2048-pixel chunks: bitwise-equal logits, dice sums and gradients with 1 and 2 threads
    (a 2-image, 3-chunk map, so both threads get work)."""
    feats, params, image_index, rel = _case(coords=True, batch=2, n=5, height=47, width=101)
    gt, gt_index = _targets(5, 47, 101)

    def run():
        f, p = feats.clone().requires_grad_(), params.clone().requires_grad_()
        out = _run("cpp", fops.dynamic_mask_head, f, p, image_index, rel_coords=rel, sigmoid=True)
        sums = _run("cpp", fops.dynamic_mask_dice_sums, f, p, image_index, gt, gt_index, rel_coords=rel)
        (out.square().sum() + sums.sum()).backward()
        return out, sums, f.grad, p.grad

    first, second, single = runs_at_two_thread_counts(run)
    for a, b, s in zip(first, second, single):
        assert torch.count_nonzero(a) > 0
        assert torch.equal(a, b) and torch.equal(a, s)


def test_triton_atomic_and_deterministic_feature_gradients_agree():
    feats, params, image_index, rel = _case(coords=True, batch=3)
    grads = []
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        f, p = feats.clone().requires_grad_(), params.clone().requires_grad_()
        _run("triton", fops.dynamic_mask_head, f, p, image_index, rel_coords=rel).sum().backward()
        grads.append((f.grad, p.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_reference_backend_with_no_instances():
    """The contracts' test_empty on the reference backend (which has no registered op to opcheck or
    compile, so it runs no contract)."""
    backend = "reference"
    feats = torch.randn(2, 8, 5, 6, requires_grad=True)
    params = torch.randn(0, 153, requires_grad=True)
    index = torch.zeros(0, dtype=torch.int64)
    out = _run(backend, fops.dynamic_mask_head, feats, params, index)
    assert out.shape == (0, 5, 6)
    gt = torch.zeros(1, 5, 6, dtype=torch.uint8)
    sums = _run(backend, fops.dynamic_mask_dice_sums, feats, params, index, gt, index)
    assert sums.shape == (0, 3)
    (out.sum() + sums.sum()).backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats)) and params.grad.shape == (0, 153)


@pytest.mark.skipif(not _INTERPRETING, reason="Triton on CPU tensors needs the interpreter")
def test_triton_out_of_range_image_without_checks_writes_zeros():
    """Without the synchronising checks the Triton kernels stay memory-safe: zeros, no garbage."""
    feats, params, _, _ = _case()
    index = torch.tensor([0, 1, 5, -3, 1, 0, 0])
    fops.set_input_checks(False)
    try:
        out = _run("triton", fops.dynamic_mask_head, feats, params, index)
    finally:
        fops.set_input_checks(True)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.equal(out[3], torch.zeros_like(out[3]))
    good = _run("triton", fops.dynamic_mask_head, feats, params[[0, 1]], index[[0, 1]])
    torch.testing.assert_close(out[[0, 1]], good)
    gt, _ = _targets(7, 13, 17)
    gt_index = torch.tensor([0, 9, 1, 1, -7, 2, 3])  # 9 and -7 are out of [-1, 4): no target
    fops.set_input_checks(False)
    try:
        sums = _run("triton", fops.dynamic_mask_dice_sums, feats, params, index, gt, gt_index)
    finally:
        fops.set_input_checks(True)
    assert torch.equal(sums[2], torch.zeros(3)) and torch.equal(sums[3], torch.zeros(3))  # bad image
    no_target = _run("triton", fops.dynamic_mask_dice_sums, feats, params[[1, 4]], index[[1, 4]], gt,
                     torch.tensor([-1, -1]))
    torch.testing.assert_close(sums[[1, 4]], no_target)


# --------------------------------------------------------------------------------------------
# Bad input

def _bad_calls():
    feats, params, index, rel = _case(coords=False)
    n = params.shape[0]
    gt, gt_index = _targets(n, 13, 17)
    head = fops.dynamic_mask_head
    dice = fops.dynamic_mask_dice_sums
    xy, soi = torch.rand(n, 2), torch.full((n,), 64.0)
    return [
        ("P", ValueError, "params must have P = 153", lambda: head(feats, params[:, :150], index)),
        ("P coords", ValueError, "P = 169", lambda: head(feats, params, index, rel_coords=(xy, soi, 8))),
        ("layers", ValueError, "num_layers must be in", lambda: head(feats, params, index, num_layers=5)),
        ("channels", ValueError, "channels must be in", lambda: head(feats, params, index, channels=17)),
        ("channels type", TypeError, "channels must be an int", lambda: head(feats, params, index, channels=8.0)),
        ("4D", ValueError, r"mask_feats must be \[B, C, H, W\]", lambda: head(feats[0], params, index)),
        ("feature channels", ValueError, "params must have P = ", lambda: head(feats[:, :6], params, index)),
        ("too many channels", ValueError, "1 to 64 channels",
         lambda: head(torch.randn(1, 65, 2, 2), params, index)),
        ("int feats", TypeError, "mask_feats must be a floating-point", lambda: head(feats.long(), params, index)),
        ("dtype mismatch", TypeError, "params must have the dtype of mask_feats",
         lambda: head(feats, params.double(), index)),
        ("index dtype", TypeError, "image_index must be an int64", lambda: head(feats, params, index.int())),
        ("index length", ValueError, r"image_index must be \[N\]", lambda: head(feats, params, index[:3])),
        ("index range", RuntimeError, r"image_index\[2\] = 2 is out of range \[0, 2\)",
         lambda: head(feats, params, torch.tensor([0, 1, 2, 0, 0, 0, 0]))),
        ("index negative", RuntimeError, r"image_index\[0\] = -1 is out of range",
         lambda: head(feats, params, torch.tensor([-1, 1, 1, 0, 0, 0, 0]))),
        ("rel_coords type", TypeError, "rel_coords must be a tuple", lambda: head(feats, params, index, rel_coords=xy)),
        ("rel_coords xy", ValueError, r"inst_xy\) must be \[N, 2\]",
         lambda: head(feats, params, index, rel_coords=(xy[:, :1], soi, 8))),
        ("rel_coords soi", ValueError, r"soi\) must be \[N\]",
         lambda: head(feats, params, index, rel_coords=(xy, soi[:2], 8))),
        ("rel_coords stride", ValueError, "mask_stride\\) must be positive",
         lambda: head(feats, params, index, rel_coords=(xy, soi, 0))),
        ("gt dtype", TypeError, "gt_masks must be a uint8 tensor",
         lambda: dice(feats, params, index, gt.float(), gt_index)),
        ("gt shape", ValueError, r"gt_masks must be \[G, 13, 17\]",
         lambda: dice(feats, params, index, gt[:, :5], gt_index)),
        ("gt_index dtype", TypeError, "gt_index must be an int64 tensor",
         lambda: dice(feats, params, index, gt, gt_index.int())),
        ("gt_index length", ValueError, r"gt_index must be \[N\]",
         lambda: dice(feats, params, index, gt, gt_index[:2])),
        ("gt_index range", RuntimeError, r"gt_index\[1\] = 4 is out of range \[-1, 4\)",
         lambda: dice(feats, params, index, gt, torch.tensor([0, 4, 0, 0, 0, 0, 0]))),
        ("not a tensor", TypeError, "params must be a torch.Tensor", lambda: head(feats, params.tolist(), index)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_clear_error(backend, case):
    _, error, message, call = _bad_calls()[case]
    with fops.use_backend("dynamic_mask_head", backend), pytest.raises(error, match=message):
        call()


def test_cpp_kernel_checks_values_itself():
    """The C++ op checks values even when called directly (no Python checks in front)."""
    feats, params, _, _ = _case()
    with pytest.raises(RuntimeError, match=r"image_index\[1\] = 9 is out of range"):
        torch.ops.fastdiffinst.dynamic_mask_head(feats, params, torch.tensor([0, 9, 0, 0, 0, 0, 0]), None, None, 4, 8,
                                                 3, False)


# --------------------------------------------------------------------------------------------
# Module, backends, GPU compilation

def test_module_diffusioninst_and_condinst():
    head = fops.DynamicMaskHead()
    assert head.num_params == 153 and "num_params=153" in repr(head)
    cond = fops.DynamicMaskHead(rel_coords=True, mask_stride=8)
    assert cond.num_params == 169
    feats, params, index, rel = _case(coords=True)
    torch.testing.assert_close(cond(feats, params, index, rel[0], rel[1]),
                               fops.dynamic_mask_head(feats, params, index, rel_coords=rel))
    gt, gt_index = _targets(params.shape[0], 13, 17)
    torch.testing.assert_close(cond.dice_sums(feats, params, index, gt, gt_index, rel[0], rel[1]),
                               fops.dynamic_mask_dice_sums(feats, params, index, gt, gt_index, rel_coords=rel))
    with pytest.raises(ValueError, match="rel_coords=True; pass inst_xy and soi both"):
        cond(feats, params, index)
    with pytest.raises(ValueError, match="rel_coords=False; pass inst_xy and soi neither"):
        head(feats, params[:, :153], index, rel[0])


def test_backend_selection():
    info = fops.backend_info()["dynamic_mask_head"]
    assert info["cpu"].startswith("cpp:") and info["cuda"].startswith("triton:")
    with pytest.raises(ValueError, match="no backend 'cuda'"), fops.use_backend("dynamic_mask_head", "cuda"):
        pass
    with fops.use_backend("dynamic_mask_head", "triton"):
        assert fops.backend_info()["dynamic_mask_head"]["cpu"].startswith("triton: selected")


def test_triton_kernels_compile_for_hopper():
    """The interpreter accepts what the GPU compiler rejects (tl.dot with K < 16, non-constexpr
    globals, ...), so every launch configuration of the kernels is also compiled ahead of time for
    sm_90a (no GPU needed), with and without coordinates, in a fresh process with the interpreter
    off (benchmarks/kernel_registers.py, which reports each kernel's registers from ptxas)."""
    from benchmarks import kernel_registers

    rows = kernel_registers.report()
    expected = [label for coords in (True, False) for label, *_ in kernel_registers.launches(coords)]
    assert [row["kernel"] for row in rows] == expected
    assert {"forward probs BLOCK=128 TILES=16", "dice sums", "backward (dice upstream, atomic feature grad)",
            "deterministic feature grad (probs upstream)"} <= set(expected)
    for row in rows:
        assert row["registers"] > 0, row
        # The forward kernels hold their weights and one pixel's activations in registers without
        # spilling (the backward does spill: benchmarks/results/*-kernel-registers-sm90/NOTES.md).
        if row["kernel"].startswith(("forward", "dice")):
            assert row["spill_store_bytes"] == 0, row


# --------------------------------------------------------------------------------------------
# CUDA (benchmarks/gpu_check.sh): the Triton kernels compiled, against the float64 einsum

@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_cuda_forward_backward_and_dice(head, deterministic):
    in_channels, channels, num_layers, coords = head
    torch.use_deterministic_algorithms(deterministic)
    # 37×61 = 2257 pixels: two chunks of the reductions.
    feats, params, image_index, rel = _case(in_channels, channels, num_layers, coords, batch=3, n=23, height=37,
                                            width=61, device="cuda")
    gt, gt_index = _targets(23, 37, 61)
    gt, gt_index = gt.cuda(), gt_index.cuda()
    f, p = feats.clone().requires_grad_(), params.clone().requires_grad_()
    out = fops.dynamic_mask_head(f, p, image_index, channels=channels, num_layers=num_layers, rel_coords=rel,
                                 sigmoid=True)
    sums = fops.dynamic_mask_dice_sums(f, p, image_index, gt, gt_index, channels=channels, num_layers=num_layers,
                                       rel_coords=rel)
    grad = torch.randn_like(out)
    ((out * grad).sum() + sums.sum()).backward()
    f64, p64 = feats.double().requires_grad_(), params.double().requires_grad_()
    logits64 = _einsum_f64(f64, p64, image_index, channels, num_layers, rel)
    sums64 = ref.dice_sums(logits64.sigmoid(), gt, gt_index)
    ((logits64.sigmoid() * grad.double()).sum() + sums64.sum()).backward()
    assert_close_to_f64(out, logits64.sigmoid().detach(), reduce_len=8)
    assert_close_to_f64(sums, sums64.detach(), reduce_len=37 * 61)
    assert_close_to_f64(f.grad, f64.grad, reduce_len=23 * 8)
    assert_close_to_f64(p.grad, p64.grad, reduce_len=37 * 61 * 4)
