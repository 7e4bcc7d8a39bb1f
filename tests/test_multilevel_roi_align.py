"""``fastdiffinst.ops.multilevel_roi_align`` / ``MultiLevelRoIAlign``: parity with detectron2's
``ROIPooler`` written as a per-level composition of ``torchvision.ops.roi_align`` (forward and
per-level gradients), the FPN level rule and its clamps and boundaries, the op contract (opcheck,
torch.compile, unwritten outputs, empty input, gradcheck: tests/op_contract.py), determinism and
input errors (docs/design.md §2, §2.2, §6)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import Tensor

import fastdiffinst.ops as fops
from fastdiffinst import reference
from op_contract import DifferentiableOpContract
from utils import (
    assert_close_to_f64,
    deterministic_with_nan_fill,
    nan_count,
    random_boxes,
    rois_from_list,
    runs_at_two_thread_counts,
    tolerance,
    torchvision_roi_align,
    with_batch_index,
)

native = torch.ops.fastdiffinst

# 3 images of 64 x 96 px, P2-P5: maps 16x24, 8x12, 4x6, 2x3.
B, C, IMG_H, IMG_W = 3, 7, 64, 96
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
OUT = (7, 5)
MIN_LEVEL, MAX_LEVEL = 2, 5
NO_LEVEL = -1000  # a level no feature map has


def fpn_levels_fp32(boxes: Tensor, min_level: int, max_level: int, canonical_box_size: int = 224,
                    canonical_level: int = 4, clamp: bool = True) -> Tensor:
    """detectron2's level rule, written out here in fp32: floor(canonical_level +
    log2(sqrt(area) / canonical_box_size + 1e-8)). A NaN level (x2 < x1 xor y2 < y1: negative area)
    matches no level in detectron2 (its int64 cast is garbage), so the box's row stays zero: it gets
    NO_LEVEL here. -> level number (min_level .. max_level when clamped), int64."""
    b = boxes.to(torch.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size + 1e-8))
    nan = torch.isnan(level)
    if clamp:
        level = level.clamp(min=min_level, max=max_level)
    return torch.where(nan, NO_LEVEL, level.nan_to_num(0.0).to(torch.int64))


def torchvision_pooler(features: list[Tensor], rois: Tensor, output_size, scales: list[float], sampling_ratio: int,
                       aligned: bool, canonical_box_size: int = 224, canonical_level: int = 4) -> Tensor:
    """ROIPooler as detectron2 runs it: one torchvision.ops.roi_align per level on the boxes
    assigned to it, scattered back into box order. Differentiable with respect to every level."""
    min_level = round(-math.log2(scales[0]))
    levels = fpn_levels_fp32(rois[:, 1:], min_level, min_level + len(features) - 1, canonical_box_size,
                             canonical_level) - min_level
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *output_size))
    for level, (f, scale) in enumerate(zip(features, scales)):
        index = (levels == level).nonzero().squeeze(1)
        if index.numel():
            pooled = torchvision_roi_align(f, rois[index].to(f.dtype), output_size, scale, sampling_ratio, aligned)
            out = out.index_put((index,), pooled)
    return out


def level_boxes() -> Tensor:
    """Boxes (image coordinates) that hit every level, both clamps and the exact boundaries."""
    below_224 = torch.nextafter(torch.tensor(224.0), torch.tensor(0.0)).item()
    return torch.tensor([
        [10.0, 10.0, 12.0, 13.0],        # tiny: raw level -3 -> clamped to P2
        [20.0, 20.0, 20.0, 41.0],        # zero area -> P2
        [50.0, 10.0, 30.0, 40.0],        # x2 < x1: negative area, NaN level -> no level, zero row
        [50.0, 40.0, 30.0, 10.0],        # both sides reversed: area 600 -> P2
        [-20.0, -10.0, 91.9, 101.9],     # sqrt(area) 111.9 -> P2
        [-8.0, -24.0, 104.0, 88.0],      # sqrt(area) exactly 112 -> P3
        [30.0, -80.0, 86.0, 144.0],      # 56 x 224, sqrt(area) exactly 112 -> P3
        [-64.0, -80.0, 160.0, 144.0],    # exactly 224 -> P4
        [0.0, 0.0, 224.0, below_224],    # 224 x 223.99998: P4 in fp32 (P3 in fp64)
        [-176.0, -192.0, 272.0, 256.0],  # exactly 448 -> P5
        [-600.0, -500.0, 900.0, 700.0],  # huge: raw level 6 -> clamped to P5
        [-1.0, 2.0, 95.0, 63.0],         # about the whole image -> P2
    ])


# A translation that keeps every coordinate and side length exact in fp32 (so the levels stay the
# same) but moves the samples of the hand-picked boxes off exact pixel boundaries: for comparisons
# with a float64 oracle, whose coordinate arithmetic may put a sample lying exactly on the -1 edge
# on the other side of it than fp32 does.
OFF_GRID = 21 / 64


def make_case(seed: int, *, dtype: torch.dtype = torch.float32, num_random: int = 36, channels: int = C,
              shift: float = 0.0) -> tuple[list[Tensor], Tensor]:
    """Features of 4 levels and [K, 5] rois: the level boxes (translated by ``shift``) plus random
    boxes from 2 to 1200 px."""
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(B, channels, round(IMG_H * s), round(IMG_W * s), generator=g, dtype=torch.float64)
                .to(dtype) for s in SCALES]
    boxes = torch.cat([level_boxes() + shift, random_boxes(num_random, IMG_W, IMG_H, min_size=2.0, max_size=1200.0,
                                                   generator=g)])
    return features, with_batch_index(boxes, B, generator=g)


def grads(fn, features: list[Tensor], grad_out: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """(output, per-level d(output . grad_out)/d features) of ``fn(features)`` on leaf copies."""
    leaves = [f.detach().clone().requires_grad_() for f in features]
    out = fn(leaves)
    if grad_out is None:
        grad_out = torch.ones_like(out)
    return out.detach(), list(torch.autograd.grad(out, leaves, grad_out))


def test_level_boxes_cover_every_level_and_both_clamps():
    """The test boxes are what they claim (guards the parity tests below)."""
    boxes = level_boxes()
    raw = fpn_levels_fp32(boxes, MIN_LEVEL, MAX_LEVEL, clamp=False)
    clamped = fpn_levels_fp32(boxes, MIN_LEVEL, MAX_LEVEL)
    assert set(clamped.tolist()) == {2, 3, 4, 5, NO_LEVEL}
    assert ((raw < MIN_LEVEL) & (raw != NO_LEVEL)).any() and (raw > MAX_LEVEL).any()
    assert clamped.tolist() == [2, 2, NO_LEVEL, 2, 2, 3, 3, 4, 4, 5, 5, 2]
    # The fp32 boundary box really depends on the evaluation in fp32.
    b = boxes[8].double()
    fp64 = math.floor(4 + math.log2(math.sqrt((b[2] - b[0]) * (b[3] - b[1])) / 224 + 1e-8))
    assert fp64 == 3 and clamped[8] == 4
    # The package's Python level rule agrees (index from min_level).
    expected = torch.where(clamped == NO_LEVEL, -1, clamped - MIN_LEVEL)
    torch.testing.assert_close(fops.assign_fpn_levels(boxes, MIN_LEVEL, MAX_LEVEL), expected)


# --------------------------------------------------------------------------------------------
# Forward parity
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_matches_torchvision_pooler(aligned, sampling_ratio):
    features, rois = make_case(5000 + sampling_ratio)
    out = fops.multilevel_roi_align(features, rois, OUT, SCALES, sampling_ratio, aligned)
    expected = torchvision_pooler(features, rois, OUT, SCALES, sampling_ratio, aligned)
    assert out.shape == (rois.shape[0], C, *OUT) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))
    levels = fpn_levels_fp32(rois[:, 1:], MIN_LEVEL, MAX_LEVEL)
    assert set(levels.tolist()) == {2, 3, 4, 5, NO_LEVEL}
    # A box that matches no level has a zero row, as in detectron2.
    assert (out[levels == NO_LEVEL] == 0).all()


def test_forward_float64_matches_torchvision_pooler():
    features, rois = make_case(5100, dtype=torch.float64)
    out = fops.multilevel_roi_align(features, rois.double(), OUT, SCALES, 2, True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torchvision_pooler(features, rois, OUT, SCALES, 2, True),
                               **tolerance(torch.float64))


def test_level_rule_is_evaluated_in_fp32():
    """The 224 x 223.99998 box is pooled from P4 (fp32 rule), not P3 (fp64 rule), whatever the
    dtype of the features and the boxes."""
    features, _ = make_case(5150, dtype=torch.float64)
    box = level_boxes()[8]
    rois = torch.cat([torch.zeros(1), box]).double()[None]
    out = fops.multilevel_roi_align(features, rois, OUT, SCALES, 2, True)
    p4 = torchvision.ops.roi_align(features[2], rois, OUT, SCALES[2], 2, True)
    p3 = torchvision.ops.roi_align(features[1], rois, OUT, SCALES[1], 2, True)
    assert not torch.allclose(p3, p4)
    torch.testing.assert_close(out, p4, **tolerance(torch.float64))


@pytest.mark.parametrize("canonical_box_size, canonical_level", [(16, 3), (100, 5)])
def test_canonical_parameters(canonical_box_size, canonical_level):
    features, rois = make_case(5200 + canonical_box_size)
    out = fops.multilevel_roi_align(features, rois, OUT, SCALES, 2, True, canonical_box_size, canonical_level)
    expected = torchvision_pooler(features, rois, OUT, SCALES, 2, True, canonical_box_size, canonical_level)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))


def test_three_levels_from_p3():
    """min_level comes from spatial_scales[0]: P3-P5 with the P2 boxes clamped to P3."""
    features, rois = make_case(5300)
    out = fops.multilevel_roi_align(features[1:], rois, OUT, SCALES[1:], 2, False)
    torch.testing.assert_close(out, torchvision_pooler(features[1:], rois, OUT, SCALES[1:], 2, False),
                               **tolerance(torch.float32))


def test_single_level_is_roi_align():
    features, rois = make_case(5400)
    out = fops.multilevel_roi_align(features[:1], rois, OUT, SCALES[:1], -1, False)
    torch.testing.assert_close(out, torchvision.ops.roi_align(features[0], rois, OUT, SCALES[0], -1, False),
                               **tolerance(torch.float32))


def test_layouts_match_contiguous():
    features, rois = make_case(5500)
    mixed = [features[0].contiguous(memory_format=torch.channels_last),
             features[1].transpose(2, 3).contiguous().transpose(2, 3),
             features[2],
             torch.stack([torch.zeros_like(features[3]), features[3]], dim=-1).flatten(-2)[..., 1::2]]
    assert not mixed[1].is_contiguous() and not mixed[3].is_contiguous()
    for a, b in zip(mixed, features):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out = fops.multilevel_roi_align(mixed, rois, OUT, SCALES, 2, True)
    torch.testing.assert_close(out, fops.multilevel_roi_align(features, rois, OUT, SCALES, 2, True), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_vs_float64(dtype):
    features, rois = make_case(5600, dtype=dtype, shift=OFF_GRID)
    go = torch.randn(rois.shape[0], C, *OUT, generator=torch.Generator().manual_seed(5601)).to(dtype)
    out, g = grads(lambda f: fops.multilevel_roi_align(f, rois, OUT, SCALES, 2, True), features, go)
    assert out.dtype == dtype and all(t.dtype == dtype for t in g)
    out64, g64 = grads(lambda f: torchvision_pooler(f, rois.double(), OUT, SCALES, 2, True),
                       [f.double() for f in features], go.double())
    assert_close_to_f64(out, out64, msg="forward")
    for level, (a, e) in enumerate(zip(g, g64)):
        assert_close_to_f64(a, e, reduce_len=rois.shape[0], msg=f"grad of level {level}")


@pytest.mark.parametrize("aligned", [False, True])
def test_reference_matches_native(aligned):
    features, rois = make_case(5700 + int(aligned))
    out = fops.multilevel_roi_align(features, rois, OUT, SCALES, 0, aligned)
    torch.testing.assert_close(reference.multilevel_roi_align(features, rois, OUT, SCALES, 0, aligned), out,
                               **tolerance(torch.float32))
    with fops.use_backend("multilevel_roi_align", "reference"):
        torch.testing.assert_close(fops.multilevel_roi_align(features, rois, OUT, SCALES, 0, aligned), out,
                                   **tolerance(torch.float32))


def test_module_with_list_boxes_and_an_empty_image():
    g = torch.Generator().manual_seed(5800)
    features, _ = make_case(5800)
    boxes = [torch.cat([level_boxes()[:6], random_boxes(5, IMG_W, IMG_H, 2.0, 900.0, generator=g)]),
             torch.zeros(0, 4),
             torch.cat([level_boxes()[6:], random_boxes(9, IMG_W, IMG_H, 2.0, 900.0, generator=g)])]
    pooler = fops.MultiLevelRoIAlign(OUT, spatial_scales=SCALES, sampling_ratio=2)
    assert pooler.aligned and (pooler.min_level, pooler.max_level) == (2, 5) and pooler.spatial_scales == SCALES
    assert "levels=P2-P5" in repr(pooler)
    out = pooler(features, boxes)
    assert out.shape == (11 + 0 + 15, C, *OUT)
    rois = rois_from_list(boxes)
    torch.testing.assert_close(out, torchvision_pooler(features, rois, OUT, SCALES, 2, True),
                               **tolerance(torch.float32))
    torch.testing.assert_close(out, fops.multilevel_roi_align(features, rois, OUT, SCALES, 2, True), rtol=0, atol=0)


def test_module_rejects_wrong_number_of_levels():
    features, rois = make_case(5850)
    pooler = fops.MultiLevelRoIAlign(OUT, SCALES, 2)
    with pytest.raises(ValueError, match=r"this pooler has 4 levels but got 3 feature maps"):
        pooler(features[:3], [rois[rois[:, 0] == i, 1:] for i in range(B)])
    with pytest.raises(ValueError, match=r"consecutive powers of two"):
        fops.MultiLevelRoIAlign(OUT, [1 / 4, 1 / 16], 2)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 2), (False, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_torchvision_pooler(dtype, aligned, sampling_ratio):
    features, rois = make_case(6000 + sampling_ratio, dtype=dtype)
    rois = rois.to(dtype)
    go = torch.randn(rois.shape[0], C, *OUT, generator=torch.Generator().manual_seed(6001)).to(dtype)
    _, g = grads(lambda f: fops.multilevel_roi_align(f, rois, OUT, SCALES, sampling_ratio, aligned), features, go)
    _, g_tv = grads(lambda f: torchvision_pooler(f, rois, OUT, SCALES, sampling_ratio, aligned), features, go)
    assert len(g) == 4
    for level, (a, e) in enumerate(zip(g, g_tv)):
        assert a.shape == features[level].shape and a.dtype == dtype
        assert torch.count_nonzero(e) > 0, f"no box reaches level {level}"
        torch.testing.assert_close(a, e, **tolerance(dtype, rois.shape[0]), msg=lambda m, lv=level: f"level {lv}: {m}")


def test_native_backward_is_contiguous():
    features, rois = make_case(6100, dtype=torch.float64)
    rois = rois.double()
    go = torch.randn(rois.shape[0], C, *OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(6101))
    g = native._multilevel_roi_align_backward(go, rois, SCALES, [f.shape[2] for f in features],
                                              [f.shape[3] for f in features], B, C, 2, True, 224, 4)
    _, g_tv = grads(lambda f: torchvision_pooler(f, rois, OUT, SCALES, 2, True), features, go)
    for a, e in zip(g, g_tv):
        assert a.shape == e.shape and a.is_contiguous(), a.stride()
        torch.testing.assert_close(a, e, **tolerance(torch.float64, rois.shape[0]))


# Tiny pyramid for gradcheck: P2-P4 maps 9x11, 5x6, 3x3 of a 36x44 image; canonical 16 px at P3,
# so boxes of < 16, 16-32 and >= 32 px land on P2, P3 and P4.
TINY_SCALES = [1 / 4, 1 / 8, 1 / 16]


def _tiny_case(seed: int) -> tuple[list[Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, 2, h, w, dtype=torch.float64, generator=g) for h, w in ((9, 11), (5, 6), (3, 3))]
    rois = torch.tensor([[0, 2.2, 3.1, 12.6, 11.4],    # ~10 px -> P2
                         [1, 5.3, 4.2, 27.5, 24.1],    # ~21 px -> P3
                         [0, -4.4, -2.7, 38.1, 40.3],  # ~43 px -> P4
                         [1, 10.5, 6.5, 14.0, 17.5]],  # ~6 px -> P2
                        dtype=torch.float64)
    levels = fpn_levels_fp32(rois[:, 1:], 2, 4, 16, 3)
    assert levels.tolist() == [2, 3, 4, 2]
    return features, rois


# --------------------------------------------------------------------------------------------
# The op contract: opcheck, torch.compile, unwritten outputs, empty input, gradcheck
# --------------------------------------------------------------------------------------------

class TestMultiLevelRoIAlignContract(DifferentiableOpContract):
    """tests/op_contract.py on ``multilevel_roi_align(features, boxes, OUT, SCALES, ...)`` against
    the torchvision pooler: fp32/fp16 levels (one channels-last), boxes as a tensor and as a list;
    gradcheck on the tiny P2-P4 pyramid."""

    op = "multilevel_roi_align"
    grad_inputs = (0,)
    variants = ("fp32", "fp16", "fp32 list boxes")
    compile_variants = ("fp32", "fp32 list boxes", "fp32, sampling 2")  # sampling_ratio 0 (adaptive), and 2
    empty_variants = ("tensor boxes", "list boxes")
    GRADCHECK = {"aligned, sampling 2": (True, 2), "sampling 1": (False, 1)}  # (aligned, sampling_ratio)
    gradcheck_cases = ("aligned, sampling 2", "sampling 1")
    # Double backward: the backward is linear in the incoming gradient, its adjoint the forward.
    gradgradcheck_cases = ("aligned, sampling 2",)

    def make_inputs(self, variant):
        features, rois = make_case(6800, dtype=torch.float16 if variant == "fp16" else torch.float32, shift=OFF_GRID)
        features[1] = features[1].contiguous(memory_format=torch.channels_last)
        boxes = [rois[rois[:, 0] == i, 1:] for i in range(B)] if variant.endswith("list boxes") else rois
        return features, boxes, OUT, SCALES, 2 if variant.endswith("sampling 2") else 0, True

    def make_empty_inputs(self, variant):
        features, _ = make_case(6700)
        boxes = torch.zeros(0, 5) if variant == "tensor boxes" else [torch.zeros(0, 4)] * B
        return features, boxes, OUT, SCALES, 2, True

    def make_gradcheck_inputs(self, case):
        aligned, sampling_ratio = self.GRADCHECK[case]
        features, rois = _tiny_case(6200 + sampling_ratio)
        return features, rois, (2, 3), TINY_SCALES, sampling_ratio, aligned, 16, 3

    def call(self, features, boxes, *params):
        return fops.multilevel_roi_align(features, boxes, *params)

    def reference(self, features, boxes, *params):
        return torchvision_pooler(list(features), rois_from_list(boxes), *params)

    def grad_reduce_lens(self, inputs):
        return [rois_from_list(inputs[1]).shape[0]] * len(inputs[0])

    def opcheck_cases(self, backend, requires_grad):
        features, rois = _tiny_case(6300)
        features = [f.float().requires_grad_(requires_grad) for f in features]
        cases = [(native.multilevel_roi_align, (features, rois.float(), TINY_SCALES, 2, 3, 2, True, 16, 3))]
        if not requires_grad:
            grad = torch.randn(rois.shape[0], 2, 2, 3, generator=torch.Generator().manual_seed(6401))
            cases.append((native._multilevel_roi_align_backward,
                          (grad, rois.float(), TINY_SCALES, [9, 5, 3], [11, 6, 3], 2, 2, 2, False, 16, 3)))
        return cases


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

def test_compile_module_has_no_graph_break():
    torch._dynamo.reset()
    features, rois = make_case(6600)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(B)]
    explanation = torch._dynamo.explain(fops.MultiLevelRoIAlign(OUT, SCALES, 2))(features, boxes)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# --------------------------------------------------------------------------------------------
# Determinism, autocast
# --------------------------------------------------------------------------------------------

def test_backward_deterministic():
    features, rois = make_case(6900, channels=37, num_random=48)  # K = 60, several channel blocks
    go = torch.randn(rois.shape[0], 37, *OUT, generator=torch.Generator().manual_seed(6901))

    def backward():
        return grads(lambda f: fops.multilevel_roi_align(f, rois, OUT, SCALES, 2, True), features, go)[1]

    torch.use_deterministic_algorithms(True)  # restored by the conftest fixture
    first, second, single = runs_at_two_thread_counts(backward)
    for a, b, s in zip(first, second, single):
        assert torch.count_nonzero(a) > 0
        assert torch.equal(a, b) and torch.equal(a, s)


def test_autocast_keeps_dtype():
    features, rois = make_case(7000)
    eager = fops.multilevel_roi_align(features, rois, OUT, SCALES, 2, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fops.multilevel_roi_align(features, rois.double(), OUT, SCALES, 2, True)
        module_out = fops.MultiLevelRoIAlign(OUT, SCALES, 2)(features, [rois[rois[:, 0] == i, 1:] for i in range(B)])
    assert out.dtype == torch.float32 and module_out.dtype == torch.float32
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


def test_autocast_promotes_mixed_levels():
    """Under autocast, levels of mixed storage dtypes are promoted to a common one (through the
    Python function and the native op alike); outside autocast both reject them."""
    features, rois = make_case(7050)
    mixed = [features[0], features[1].bfloat16(), features[2], features[3].bfloat16()]
    args = (rois, SCALES, OUT[0], OUT[1], 2, True, 224, 4)
    expected = native.multilevel_roi_align([f.float() for f in mixed], *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = native.multilevel_roi_align(mixed, *args)
        out_py = fops.multilevel_roi_align(mixed, rois, OUT, SCALES, 2, True)
    assert out.dtype == torch.float32 and out_py.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out_py, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"features\[1\] has dtype"):
        native.multilevel_roi_align(mixed, *args)
    with pytest.raises(TypeError, match=r"features\[1\] has torch.bfloat16"):
        fops.multilevel_roi_align(mixed, rois, OUT, SCALES, 2, True)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _good():
    g = torch.Generator().manual_seed(7100)
    features = [torch.randn(2, 3, h, w, generator=g) for h, w in ((9, 11), (5, 6), (3, 3))]
    rois = torch.tensor([[0, 1.0, 1.0, 20.0, 25.0], [1, 2.0, 0.0, 30.0, 17.0]])
    return features, rois, TINY_SCALES


def _call(features, boxes, scales, **kwargs):
    return fops.multilevel_roi_align(features, boxes, kwargs.pop("output_size", 3), scales,
                                     kwargs.pop("sampling_ratio", 2), True, **kwargs)


@pytest.mark.parametrize("change, error, match", [
    (lambda f, r, s: ([], r, []), ValueError, r"features must hold at least one feature map"),
    (lambda f, r, s: (f[0], r, s), TypeError, r"features must be a list"),
    (lambda f, r, s: (f, r, s[:2]), ValueError, r"len\(spatial_scales\) must equal len\(features\) = 3, got 2"),
    (lambda f, r, s: (f[:2], r, s), ValueError, r"len\(spatial_scales\) must equal len\(features\) = 2, got 3"),
    (lambda f, r, s: ([f[0], f[1][:, :2], f[2]], r, s), ValueError,
     r"batch size and channels of features\[0\] \(2, 3\); features\[1\] has \(2, 2\)"),
    (lambda f, r, s: ([f[0], f[1], f[2][:1]], r, s), ValueError, r"features\[2\] has \(1, 3\)"),
    (lambda f, r, s: ([f[0], f[1].double(), f[2]], r, s), TypeError,
     r"every level must have the dtype of features\[0\] \(torch.float32\); features\[1\] has torch.float64"),
    (lambda f, r, s: ([f[0], f[1].long(), f[2]], r, s), TypeError, r"features\[1\] must be a floating-point"),
    (lambda f, r, s: ([f[0], f[1][0], f[2]], r, s), ValueError, r"features\[1\] must be \[B, C, H, W\]"),
    (lambda f, r, s: (f, r, [1 / 4, 1 / 16, 1 / 32]), ValueError, r"consecutive powers of two"),
    (lambda f, r, s: (f, r, [1 / 4, 1 / 8, 1 / 12]), ValueError, r"spatial_scales\[2\] must be a power of two"),
    (lambda f, r, s: (f, r, [1 / 16, 1 / 8, 1 / 4]), ValueError, r"consecutive powers of two"),
    (lambda f, r, s: (f, r, [0.0, 1 / 8, 1 / 16]), ValueError, r"spatial_scales\[0\] must be a positive number"),
    (lambda f, r, s: (f, [r[:1, 1:]], s), ValueError, r"boxes must hold one Tensor\[k, 4\] per image \(2\), got 1"),
    (lambda f, r, s: (f, [r[:1, 1:]] * 3, s), ValueError, r"per image \(2\), got 3"),
    (lambda f, r, s: (f, r[:, 1:], s), ValueError, r"boxes given as a tensor must be \[K, 5\]"),
    (lambda f, r, s: (f, [r[:1], r[1:]], s), ValueError, r"boxes\[0\] must be \[k, 4\]"),
], ids=["no_features", "not_a_list", "too_few_scales", "too_many_scales", "channels", "batch", "dtype",
        "int_level", "rank", "gap", "not_pow2", "coarse_first", "zero_scale", "list_too_short", "list_too_long",
        "boxes_k4", "list_k5"])
def test_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        _call(*change(*_good()))


def test_too_many_levels():
    g = torch.Generator().manual_seed(7200)
    features = [torch.randn(1, 2, 3, 3, generator=g) for _ in range(9)]
    with pytest.raises(ValueError, match=r"at most 8 feature levels"):
        _call(features, torch.zeros(0, 5), [2.0 ** -k for k in range(9)])


@pytest.mark.parametrize("batch_index", [2.0, -1.0])
def test_batch_index_out_of_range(batch_index):
    features, rois, scales = _good()
    rois[1, 0] = batch_index
    with pytest.raises(RuntimeError, match=r"rois\[1, 0\] is the batch index and must be in \[0, 2\)"):
        _call(features, rois, scales)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_boxes(value):
    features, rois, scales = _good()
    rois[0, 4] = value
    with pytest.raises(RuntimeError, match=r"rois must be finite, but rois\[0\]"):
        _call(features, rois, scales)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"output_size": 0}, ValueError, "output_size must be positive"),
    ({"output_size": (2, -3)}, ValueError, "output_size must be positive"),
    ({"canonical_box_size": 0}, ValueError, r"canonical_box_size must be in \[1, 2\^30\]"),
    ({"canonical_box_size": 2**32}, ValueError, r"canonical_box_size must be in \[1, 2\^30\]"),
    ({"canonical_level": 100}, ValueError, r"canonical_level must be in \[-64, 64\]"),
    ({"sampling_ratio": 2**32 + 1}, ValueError, "sampling_ratio must be at most 1024"),
    ({"canonical_box_size": 224.0}, TypeError, "canonical_box_size must be an int"),
    ({"canonical_level": 4.5}, TypeError, "canonical_level must be an int"),
])
def test_bad_arguments(kwargs, error, match):
    features, rois, scales = _good()
    with pytest.raises(error, match=match):
        _call(features, rois, scales, **kwargs)


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
class TestCuda:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("aligned, sampling_ratio", [(True, 2), (False, 0)])
    def test_forward_backward_match_float64_oracle(self, dtype, aligned, sampling_ratio):
        features, rois = make_case(8000, dtype=dtype, shift=OFF_GRID)
        go = torch.randn(rois.shape[0], C, *OUT, generator=torch.Generator().manual_seed(8001)).to(dtype)
        out, g = grads(lambda f: fops.multilevel_roi_align(f, rois.cuda(), OUT, SCALES, sampling_ratio, aligned),
                       [f.cuda() for f in features], go.cuda())
        assert out.is_cuda and out.dtype == dtype
        out64, g64 = grads(lambda f: torchvision_pooler(f, rois.double(), OUT, SCALES, sampling_ratio, aligned),
                           [f.double() for f in features], go.double())
        assert_close_to_f64(out.cpu(), out64)
        for a, e in zip(g, g64):
            assert_close_to_f64(a.cpu(), e, reduce_len=rois.shape[0])

    def test_deterministic_backward(self):
        features, rois = make_case(8100, channels=37, num_random=48, shift=OFF_GRID)
        go = torch.randn(rois.shape[0], 37, *OUT, generator=torch.Generator().manual_seed(8101))
        fn = lambda f: fops.multilevel_roi_align(f, rois.cuda(), OUT, SCALES, 2, True)  # noqa: E731
        with deterministic_with_nan_fill():
            first = grads(fn, [f.cuda() for f in features], go.cuda())[1]
            second = grads(fn, [f.cuda() for f in features], go.cuda())[1]
        _, g_cpu = grads(lambda f: fops.multilevel_roi_align(f, rois, OUT, SCALES, 2, True), features, go)
        for a, b, c in zip(first, second, g_cpu):
            assert torch.equal(a, b) and nan_count(a) == 0
            torch.testing.assert_close(a.cpu(), c, **tolerance(torch.float32, rois.shape[0]))

    def test_no_boxes_and_value_checks(self):
        features, rois, scales = _good()
        features = [f.cuda() for f in features]
        out, g = grads(lambda f: _call(f, torch.zeros(0, 5, device="cuda"), scales).sum(), features)
        assert all(torch.count_nonzero(t) == 0 for t in g)
        rois[1, 0] = 2.0
        with pytest.raises(RuntimeError, match=r"rois\[1, 0\] is the batch index"):
            _call(features, rois.cuda(), scales)

    def test_opcheck_and_compile(self):
        features, rois = _tiny_case(8200)
        features = [f.float().cuda().requires_grad_() for f in features]
        torch.library.opcheck(native.multilevel_roi_align,
                              (features, rois.float().cuda(), TINY_SCALES, 2, 3, 2, True, 16, 3))
        grad = torch.randn(rois.shape[0], 2, 2, 3, device="cuda")
        torch.library.opcheck(native._multilevel_roi_align_backward,
                              (grad, rois.float().cuda(), TINY_SCALES, [9, 5, 3], [11, 6, 3], 2, 2, 2, True, 16, 3))
        compiled = torch.compile(lambda f: fops.multilevel_roi_align(f, rois.float().cuda(), (2, 3), TINY_SCALES,
                                                                     2, True, 16, 3), fullgraph=True,
                                 backend="aot_eager")
        torch.testing.assert_close(compiled(features),
                                   fops.multilevel_roi_align(features, rois.float().cuda(), (2, 3), TINY_SCALES, 2,
                                                             True, 16, 3))
