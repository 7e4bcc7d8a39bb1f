"""``fastdiffinst.ops.roi_align`` / ``RoIAlign``: parity with ``torchvision.ops.roi_align`` (forward
and backward, every dtype and layout), the op contract (opcheck, torch.compile, unwritten outputs,
empty input, gradcheck: tests/op_contract.py), determinism, autocast and input errors
(docs/design.md §2, §2.2, §6)."""

from __future__ import annotations

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
    edge_case_boxes,
    nan_count,
    random_boxes,
    rois_from_list,
    runs_at_two_thread_counts,
    tolerance,
    with_batch_index,
)
from utils import torchvision_roi_align as tv_roi_align

native = torch.ops.fastdiffinst

B, C, H, W = 3, 5, 13, 17
OUT = (7, 5)
# Moves the hand-picked boxes' samples off exact pixel boundaries (-1, size), where one ulp of a
# different coordinate arithmetic (fp64 oracle, FMA contraction on CUDA) flips a sample in or out.
OFF_GRID = 21 / 64


def make_case(seed: int, *, scale: float = 1.0, batch: int = B, channels: int = C, height: int = H, width: int = W,
              num_random: int = 29, dtype: torch.dtype = torch.float32,
              shift: float = 0.0) -> tuple[Tensor, Tensor]:
    """Features [batch, channels, height, width] and [K, 5] rois in image coordinates (image =
    feature map / scale): random boxes of every size, some sticking out, plus the edge cases
    (translated by ``shift``; see OFF_GRID)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64).to(dtype)
    img_w, img_h = width / scale, height / scale
    boxes = torch.cat([random_boxes(num_random, img_w, img_h, min_size=0.5, generator=g),
                       edge_case_boxes(img_w, img_h) + shift])
    return x, with_batch_index(boxes, batch, generator=g)


def grads(fn, x: Tensor, grad_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(output, d(output . grad_out)/dx) of ``fn(x)`` for a leaf copy of ``x``."""
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf)
    if grad_out is None:
        grad_out = torch.ones_like(out)
    (g,) = torch.autograd.grad(out, leaf, grad_out)
    return out.detach(), g


# --------------------------------------------------------------------------------------------
# Forward parity
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 0.25, 1 / 3])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_matches_torchvision(aligned, sampling_ratio, spatial_scale):
    x, rois = make_case(1000 + sampling_ratio, scale=spatial_scale)
    out = fops.roi_align(x, rois, OUT, spatial_scale, sampling_ratio, aligned)
    expected = tv_roi_align(x, rois, OUT, spatial_scale, sampling_ratio, aligned)
    assert out.shape == (rois.shape[0], C, *OUT) and out.dtype == torch.float32
    assert expected.abs().sum() > 0
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))


@pytest.mark.parametrize("spatial_scale", [1.0, 1 / 3])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_float64_matches_torchvision(aligned, sampling_ratio, spatial_scale):
    x, rois = make_case(1100, scale=spatial_scale, dtype=torch.float64)
    rois = rois.double()
    out = fops.roi_align(x, rois, OUT, spatial_scale, sampling_ratio, aligned)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, tv_roi_align(x, rois, OUT, spatial_scale, sampling_ratio, aligned),
                               **tolerance(torch.float64))


@pytest.mark.parametrize("aligned", [False, True])
def test_edge_boxes_exact_values(aligned):
    """Boxes fully outside give zeros (torchvision: every sample outside [-1, size]); degenerate
    boxes match torchvision (clamped to 1x1 when not aligned, empty grids when aligned)."""
    x, _ = make_case(1200)
    boxes = edge_case_boxes(W, H)
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
    out = fops.roi_align(x, rois, OUT, 1.0, -1, aligned)
    torch.testing.assert_close(out, tv_roi_align(x, rois, OUT, 1.0, -1, aligned), **tolerance(torch.float32))
    for k in (2, 3, 4):  # fully outside (further than one pixel): exactly zero
        assert torch.count_nonzero(out[k]) == 0
    assert torch.count_nonzero(out[10]) == out[10].numel()  # the whole image


@pytest.mark.parametrize("sampling_ratio", [-1, 0])
def test_reversed_boxes_aligned_adaptive_are_zero(sampling_ratio):
    """aligned=True with an adaptive grid: a reversed side gives an empty sampling grid, so zero
    bins and zero gradient (torchvision returns 0 when both sides are reversed and throws when
    one is). With a fixed grid the same boxes sample backwards and are not zero."""
    x, _ = make_case(1250)
    rois = torch.tensor([[0, 12.0, 2.0, 3.0, 9.0], [1, 2.0, 11.0, 14.0, 1.0], [2, 15.0, 12.0, 4.0, 3.0]])
    out, g = grads(lambda t: fops.roi_align(t, rois, OUT, 1.0, sampling_ratio, True), x)
    assert torch.count_nonzero(out) == 0 and torch.count_nonzero(g) == 0
    torch.testing.assert_close(out[2], torchvision.ops.roi_align(x, rois[2:], OUT, 1.0, sampling_ratio, True)[0])
    torch.testing.assert_close(reference.roi_align(x, rois, OUT, 1.0, sampling_ratio, True), out)
    fixed = fops.roi_align(x, rois, OUT, 1.0, 2, True)
    torch.testing.assert_close(fixed, torchvision.ops.roi_align(x, rois, OUT, 1.0, 2, True), **tolerance(torch.float32))
    assert torch.count_nonzero(fixed) == fixed.numel()


def test_output_size_int_and_rectangular():
    x, rois = make_case(1300)
    torch.testing.assert_close(fops.roi_align(x, rois, 3, 0.5, 2), tv_roi_align(x, rois, 3, 0.5, 2),
                               **tolerance(torch.float32))
    torch.testing.assert_close(fops.roi_align(x, rois, (1, 11), 0.5, 0, True),
                               tv_roi_align(x, rois, (1, 11), 0.5, 0, True), **tolerance(torch.float32))


@pytest.mark.parametrize("layout", ["permuted", "strided", "channels_last"])
def test_layouts_match_contiguous(layout):
    x, rois = make_case(1400)
    if layout == "permuted":  # [B, H, C, W] storage seen as [B, C, H, W]: neither NCHW nor NHWC
        y = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        assert not y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider map, at an offset
        wide = torch.zeros(B, C, H, 2 * W + 1)
        wide[..., 1::2] = x
        y = wide[..., 1::2]
        assert y.storage_offset() == 1 and y.stride(3) == 2
    else:
        y = x.contiguous(memory_format=torch.channels_last)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    go = torch.randn(rois.shape[0], C, *OUT, generator=torch.Generator().manual_seed(1401))

    def fn(t):
        return fops.roi_align(t, rois, OUT, 0.5, 2, True)

    out, g = grads(fn, y, go)
    out_tv, g_tv = grads(lambda t: tv_roi_align(t, rois, OUT, 0.5, 2, True), x, go)
    torch.testing.assert_close(out, out_tv, **tolerance(torch.float32))
    torch.testing.assert_close(g, g_tv, **tolerance(torch.float32, rois.shape[0]))


def test_list_of_boxes_matches_torchvision():
    g = torch.Generator().manual_seed(1500)
    x = torch.randn(B, C, H, W, generator=g)
    boxes = [random_boxes(n, 2 * W, 2 * H, generator=g) for n in (4, 0, 7)]
    boxes[2] = torch.cat([boxes[2], edge_case_boxes(2 * W, 2 * H)])
    out = fops.roi_align(x, boxes, OUT, 0.5, -1, True)
    assert out.shape == (4 + 0 + 7 + 13, C, *OUT)
    torch.testing.assert_close(out, tv_roi_align(x, boxes, OUT, 0.5, -1, True), **tolerance(torch.float32))
    rois = rois_from_list(boxes)
    torch.testing.assert_close(out, fops.roi_align(x, rois, OUT, 0.5, -1, True), rtol=0, atol=0)


@pytest.mark.parametrize("box_dtype", [torch.float16, torch.float64])
def test_boxes_of_another_float_dtype(box_dtype):
    """Boxes may have any float dtype; the coordinates are read in fp32 for fp32 features."""
    x, rois = make_case(1600)
    rois = rois.to(box_dtype)
    out = fops.roi_align(x, rois, OUT, 0.5, 2, False)
    torch.testing.assert_close(out, tv_roi_align(x, rois.float(), OUT, 0.5, 2, False), **tolerance(torch.float32))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_vs_float64(dtype, aligned):
    """fp16/bf16 storage: forward and backward against torchvision in float64 on the same rounded
    inputs, within the dtype's tolerance."""
    x, rois = make_case(1700 + int(aligned), scale=0.5, dtype=dtype)
    go = torch.randn(rois.shape[0], C, *OUT, generator=torch.Generator().manual_seed(1701)).to(dtype)
    out, g = grads(lambda t: fops.roi_align(t, rois, OUT, 0.5, -1, aligned), x, go)
    assert out.dtype == dtype and g.dtype == dtype and g.shape == x.shape
    out64, g64 = grads(lambda t: tv_roi_align(t, rois.double(), OUT, 0.5, -1, aligned), x.double(), go.double())
    assert_close_to_f64(out, out64, msg="forward")
    assert_close_to_f64(g, g64, reduce_len=rois.shape[0], msg="grad input")


@pytest.mark.parametrize("spatial_scale", [1.0, 1 / 3])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_reference_matches_torchvision(aligned, sampling_ratio, spatial_scale):
    x, rois = make_case(1800, scale=spatial_scale)
    out = reference.roi_align(x, rois, OUT, spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, tv_roi_align(x, rois, OUT, spatial_scale, sampling_ratio, aligned),
                               **tolerance(torch.float32))


def test_reference_backward_matches_torchvision():
    x, rois = make_case(1810, dtype=torch.float64)
    rois = rois.double()
    go = torch.randn(rois.shape[0], C, *OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(1811))
    _, g = grads(lambda t: reference.roi_align(t, rois, OUT, 0.5, 0, True), x, go)
    _, g_tv = grads(lambda t: tv_roi_align(t, rois, OUT, 0.5, 0, True), x, go)
    torch.testing.assert_close(g, g_tv, **tolerance(torch.float64, rois.shape[0]))


def test_module_matches_torchvision_module():
    g = torch.Generator().manual_seed(1900)
    x = torch.randn(B, C, H, W, generator=g)
    boxes = [random_boxes(n, 4 * W, 4 * H, generator=g) for n in (5, 3, 6)]
    ours = fops.RoIAlign(OUT, 0.25, 2, aligned=True)
    theirs = torchvision.ops.RoIAlign(OUT, 0.25, 2, aligned=True)
    torch.testing.assert_close(ours(x, boxes), theirs(x, boxes), **tolerance(torch.float32))
    rois = rois_from_list(boxes)
    torch.testing.assert_close(ours(x, rois), theirs(x, rois), **tolerance(torch.float32))
    assert "output_size=(7, 5)" in repr(ours) and "aligned=True" in repr(ours)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_torchvision(dtype, aligned, sampling_ratio):
    x, rois = make_case(2000 + sampling_ratio, scale=0.5, dtype=dtype)
    rois = rois.to(dtype)
    go = torch.randn(rois.shape[0], C, *OUT, generator=torch.Generator().manual_seed(2001)).to(dtype)
    _, g = grads(lambda t: fops.roi_align(t, rois, OUT, 0.5, sampling_ratio, aligned), x, go)
    _, g_tv = grads(lambda t: tv_roi_align(t, rois, OUT, 0.5, sampling_ratio, aligned), x, go)
    assert g.dtype == dtype and g.shape == x.shape
    assert torch.count_nonzero(g_tv) > 0
    torch.testing.assert_close(g, g_tv, **tolerance(dtype, rois.shape[0]))


def test_leaf_grad_accumulates_like_torchvision():
    """``.backward()`` into a leaf (layout of the leaf, accumulation over two calls)."""
    x, rois = make_case(2100)
    ours = x.clone().requires_grad_()
    theirs = x.clone().requires_grad_()
    for _ in range(2):
        fops.roi_align(ours, rois, OUT, 1.0, 2, False).square().sum().backward()
        tv_roi_align(theirs, rois, OUT, 1.0, 2, False).square().sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, **tolerance(torch.float32, 2 * rois.shape[0]))


def test_zero_stride_grad_output():
    """``out.sum().backward()`` hands the backward an expanded (zero-stride) gradient."""
    x, rois = make_case(2200)
    _, g_sum = grads(lambda t: fops.roi_align(t, rois, OUT, 1.0, -1, True).sum(), x)
    _, g_ones = grads(lambda t: fops.roi_align(t, rois, OUT, 1.0, -1, True), x)
    _, g_tv = grads(lambda t: tv_roi_align(t, rois, OUT, 1.0, -1, True), x)
    torch.testing.assert_close(g_sum, g_ones, rtol=0, atol=0)
    torch.testing.assert_close(g_sum, g_tv, **tolerance(torch.float32, rois.shape[0]))


def test_native_backward_is_contiguous():
    """The native backward returns a contiguous (NCHW) gradient with the values of torchvision's."""
    x, rois = make_case(2300, dtype=torch.float64)
    rois = rois.double()
    go = torch.randn(rois.shape[0], C, *OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(2301))
    g = native._roi_align_backward(go, rois, 1.0, OUT[0], OUT[1], B, C, H, W, 2, True)
    assert g.shape == (B, C, H, W) and g.dtype == torch.float64
    assert g.is_contiguous(), g.stride()
    _, g_tv = grads(lambda t: tv_roi_align(t, rois, OUT, 1.0, 2, True), x, go)
    torch.testing.assert_close(g, g_tv, **tolerance(torch.float64, rois.shape[0]))


def _gradcheck_case(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=g)
    rois = torch.tensor([[0, 2.6, 1.4, 15.8, 16.4],   # inside (image = map / 0.5)
                         [1, -3.0, 4.4, 10.2, 19.2],  # partly outside
                         [1, 8.8, 6.6, 21.6, 12.2],
                         [0, 4.0, 10.0, 4.0, 15.0]],  # zero width
                        dtype=torch.float64)
    return x, rois


# --------------------------------------------------------------------------------------------
# The op contract: opcheck, torch.compile, unwritten outputs, empty input, gradcheck
# --------------------------------------------------------------------------------------------

class TestRoIAlignContract(DifferentiableOpContract):
    """tests/op_contract.py on ``roi_align(input, boxes, OUT, 0.5, 2, aligned=True)`` against
    torchvision: fp32/bf16 features, NCHW and channels-last, boxes as a tensor and as a list."""

    op = "roi_align"
    grad_inputs = (0,)
    variants = ("fp32", "fp32 channels-last", "bf16", "bf16 channels-last", "fp32 list boxes")
    compile_variants = ("fp32", "fp32 list boxes")
    empty_variants = ("tensor boxes", "list boxes")
    # (aligned, sampling_ratio) on the small float64 case
    GRADCHECK = {"sampling 1": (False, 1), "sampling 2": (False, 2), "aligned, sampling 1": (True, 1),
                 "aligned, sampling 2": (True, 2), "adaptive": (False, -1)}
    gradcheck_cases = ("sampling 1", "sampling 2", "aligned, sampling 1", "aligned, sampling 2")
    gradgradcheck_cases = ("aligned, sampling 2", "adaptive")

    def make_inputs(self, variant):
        x, rois = make_case(3100, scale=0.5, dtype=torch.bfloat16 if variant.startswith("bf16") else torch.float32)
        if variant.endswith("channels-last"):
            x = x.contiguous(memory_format=torch.channels_last)
        boxes = [rois[rois[:, 0] == i, 1:] for i in range(B)] if variant.endswith("list boxes") else rois
        return x, boxes, OUT, 0.5, 2, True

    def make_empty_inputs(self, variant):
        x, _ = make_case(3000)
        return x, torch.zeros(0, 5) if variant == "tensor boxes" else [torch.zeros(0, 4)] * B, OUT, 0.5, 2, True

    def make_gradcheck_inputs(self, case):
        aligned, sampling_ratio = self.GRADCHECK[case]
        x, rois = _gradcheck_case(2400 + sampling_ratio)
        return x, rois, (3, 2), 0.5, sampling_ratio, aligned

    def call(self, input, boxes, *params):
        return fops.roi_align(input, boxes, *params)

    def reference(self, input, boxes, *params):
        return tv_roi_align(input, rois_from_list(boxes).to(input.dtype), *params)

    def grad_reduce_lens(self, inputs):
        return [rois_from_list(inputs[1]).shape[0]]

    def opcheck_cases(self, backend, requires_grad):
        x, rois = _gradcheck_case(2600)
        cases = [(native.roi_align, (x.float().requires_grad_(requires_grad), rois.float(), 0.5, 3, 2, 2, True))]
        if not requires_grad:
            grad = torch.randn(rois.shape[0], 3, 3, 2, generator=torch.Generator().manual_seed(2701))
            cases.append((native._roi_align_backward, (grad, rois.float(), 0.5, 3, 2, 2, 3, 9, 11, -1, False)))
        return cases


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

def test_compile_explain_has_no_graph_break():
    torch._dynamo.reset()
    x, rois = make_case(2850)
    module = fops.RoIAlign(OUT, 1.0, -1, aligned=False)
    explanation = torch._dynamo.explain(module)(x, rois)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_inductor_matches_eager():
    """The one inductor run of the RoIAlign tests (forward and backward, with ops around it)."""
    torch._dynamo.reset()
    x, rois = make_case(2900, scale=0.5)

    def fn(t):
        return fops.roi_align(t * 2.0, rois, OUT, 0.5, -1, True).relu()

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    go = torch.randn(rois.shape[0], C, *OUT, generator=torch.Generator().manual_seed(2901))
    out_e, g_e = grads(fn, x, go)
    out_c, g_c = grads(compiled, x, go)
    torch.testing.assert_close(out_c, out_e, **tolerance(torch.float32))
    torch.testing.assert_close(g_c, g_e, **tolerance(torch.float32, rois.shape[0]))


# --------------------------------------------------------------------------------------------
# Determinism, autocast
# --------------------------------------------------------------------------------------------

def test_backward_deterministic_across_runs_and_threads():
    x, rois = make_case(3200, channels=37, num_random=47, scale=0.5)  # K = 60; several channel blocks
    go = torch.randn(rois.shape[0], 37, *OUT, generator=torch.Generator().manual_seed(3201))

    def backward():
        return grads(lambda t: fops.roi_align(t, rois, OUT, 0.5, -1, True), x, go)[1]

    first, second, single = runs_at_two_thread_counts(backward)
    assert torch.count_nonzero(first) > 0
    assert torch.equal(first, second)
    assert torch.equal(first, single)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_keeps_input_dtype(dtype):
    x, rois = make_case(3300, dtype=dtype)
    eager = fops.roi_align(x, rois.double(), OUT, 1.0, 2, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fops.roi_align(x, rois.double(), OUT, 1.0, 2, True)
        module_out = fops.RoIAlign(OUT, 1.0, 2, True)(x, rois)
    assert out.dtype == dtype and module_out.dtype == dtype
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _good():
    x = torch.randn(2, 3, 9, 11)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0], [1, 2.0, 0.0, 8.0, 7.0]])
    return x, rois


@pytest.mark.parametrize("change, error, match", [
    (lambda x, r: (x[0], r), ValueError, r"input must be \[B, C, H, W\] \(4-D\), got shape \(3, 9, 11\)"),
    (lambda x, r: (x[None], r), ValueError, r"input must be .*4-D"),
    (lambda x, r: (x.long(), r), TypeError, r"input must be a floating-point tensor"),
    (lambda x, r: (x.int(), r), TypeError, r"input"),
    (lambda x, r: (x.numpy(), r), TypeError, r"input must be a torch.Tensor"),
    (lambda x, r: (x, r[:, 1:]), ValueError, r"boxes given as a tensor must be \[K, 5\].*got shape \(2, 4\)"),
    (lambda x, r: (x, r[None]), ValueError, r"boxes.*\[K, 5\]"),
    (lambda x, r: (x, r.long()), TypeError, r"boxes must be a floating-point tensor"),
    (lambda x, r: (x, [r[:1, 1:], r[:, :]]), ValueError, r"boxes\[1\] must be \[k, 4\]"),
    (lambda x, r: (x, r.tolist()), TypeError, r"boxes\[0\] must be a torch.Tensor"),
    (lambda x, r: (x, "boxes"), TypeError, r"boxes must be a Tensor\[K, 5\] or a list"),
], ids=["3d", "5d", "int64", "int32", "numpy", "boxes_k4", "boxes_3d", "boxes_int", "list_k5", "list_of_lists",
        "boxes_str"])
def test_bad_tensors(change, error, match):
    x, rois = change(*_good())
    with pytest.raises(error, match=match):
        fops.roi_align(x, rois, 3, 1.0, 2, True)


@pytest.mark.parametrize("batch_index", [2.0, 7.0, -1.0])
def test_batch_index_out_of_range(batch_index):
    x, rois = _good()
    rois[1, 0] = batch_index
    with pytest.raises(RuntimeError, match=r"rois\[1, 0\] is the batch index and must be in \[0, 2\)"):
        fops.roi_align(x, rois, 3, 1.0, 2, True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("column", [0, 3])
def test_non_finite_boxes(value, column):
    x, rois = _good()
    rois[1, column] = value
    with pytest.raises(RuntimeError, match=r"rois must be finite, but rois\[1\]"):
        fops.roi_align(x, rois, 3, 1.0, 2, True)


def test_native_op_checks_values_too():
    x, rois = _good()
    rois[0, 0] = 5.0
    with pytest.raises(RuntimeError, match="batch index"):
        native.roi_align(x, rois, 1.0, 3, 3, 2, True)
    rois[0, 0] = 0.0
    with pytest.raises(RuntimeError, match="batch index"):
        native._roi_align_backward(torch.ones(2, 3, 3, 3), rois, 1.0, 3, 3, 1, 3, 9, 11, 2, True)


@pytest.mark.parametrize("output_size", [0, -2, (0, 3), (3, -1), (0, 0)])
def test_output_size_non_positive(output_size):
    x, rois = _good()
    with pytest.raises(ValueError, match=r"output_size must be positive"):
        fops.roi_align(x, rois, output_size, 1.0, 2, True)
    with pytest.raises(ValueError, match=r"output_size must be positive"):
        fops.RoIAlign(output_size, 1.0, 2)


@pytest.mark.parametrize("output_size", [2.5, (3,), (3, 3, 3), (3.0, 3), True])
def test_output_size_wrong_type(output_size):
    x, rois = _good()
    with pytest.raises(TypeError, match=r"output_size must be an int or a pair of ints"):
        fops.roi_align(x, rois, output_size, 1.0, 2, True)


@pytest.mark.parametrize("spatial_scale", [0.0, -0.25, float("nan"), float("inf")])
def test_spatial_scale_not_positive(spatial_scale):
    x, rois = _good()
    with pytest.raises(ValueError, match=r"spatial_scale must be a positive finite number"):
        fops.roi_align(x, rois, 3, spatial_scale, 2, True)
    with pytest.raises(ValueError, match=r"spatial_scale"):
        fops.RoIAlign(3, spatial_scale, 2)


@pytest.mark.parametrize("sampling_ratio", [2.0, None, True])
def test_sampling_ratio_not_int(sampling_ratio):
    x, rois = _good()
    with pytest.raises(TypeError, match=r"sampling_ratio must be an int"):
        fops.roi_align(x, rois, 3, 1.0, sampling_ratio, True)


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
class TestCuda:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("aligned", [False, True])
    def test_forward_backward_match_float64_oracle(self, dtype, aligned):
        x, rois = make_case(4000, scale=0.5, dtype=dtype, shift=OFF_GRID)
        go = torch.randn(rois.shape[0], C, *OUT, generator=torch.Generator().manual_seed(4001)).to(dtype)
        out, g = grads(lambda t: fops.roi_align(t, rois.cuda(), OUT, 0.5, -1, aligned), x.cuda(), go.cuda())
        assert out.is_cuda and out.dtype == dtype
        out64, g64 = grads(lambda t: tv_roi_align(t, rois.double(), OUT, 0.5, -1, aligned), x.double(),
                           go.double())
        assert_close_to_f64(out.cpu(), out64)
        assert_close_to_f64(g.cpu(), g64, reduce_len=rois.shape[0])

    def test_deterministic_backward(self):
        x, rois = make_case(4100, channels=37, num_random=47, scale=0.5, shift=OFF_GRID)
        go = torch.randn(rois.shape[0], 37, *OUT, generator=torch.Generator().manual_seed(4101)).cuda()
        with deterministic_with_nan_fill():
            first = grads(lambda t: fops.roi_align(t, rois.cuda(), OUT, 0.5, 2, True), x.cuda(), go)[1]
            second = grads(lambda t: fops.roi_align(t, rois.cuda(), OUT, 0.5, 2, True), x.cuda(), go)[1]
        assert torch.equal(first, second) and nan_count(first) == 0
        _, g_cpu = grads(lambda t: fops.roi_align(t, rois, OUT, 0.5, 2, True), x, go.cpu())
        torch.testing.assert_close(first.cpu(), g_cpu, **tolerance(torch.float32, rois.shape[0]))

    def test_value_checks_with_input_checks(self):
        x, rois = _good()
        rois[1, 0] = 2.0
        with pytest.raises(RuntimeError, match=r"rois\[1, 0\] is the batch index"):
            fops.roi_align(x.cuda(), rois.cuda(), 3, 1.0, 2, True)
        rois[1, 0] = 1.0
        rois[0, 2] = float("nan")
        with pytest.raises(RuntimeError, match=r"rois must be finite"):
            fops.roi_align(x.cuda(), rois.cuda(), 3, 1.0, 2, True)

    def test_opcheck(self):
        x, rois = _gradcheck_case(4200)
        x = x.float().cuda().requires_grad_()
        torch.library.opcheck(native.roi_align, (x, rois.float().cuda(), 0.5, 3, 2, 2, True))
        grad = torch.randn(rois.shape[0], 3, 3, 2, device="cuda")
        torch.library.opcheck(native._roi_align_backward, (grad, rois.float().cuda(), 0.5, 3, 2, 2, 3, 9, 11, 2, True))


def test_low_precision_list_boxes_keep_exact_image_indices():
    """A list of bf16 boxes for more than 256 images: the image index column must stay exact
    (bf16 holds integers up to 256 only)."""
    g = torch.Generator().manual_seed(9100)
    x = torch.randn(259, 1, 4, 4, generator=g)
    boxes = [torch.tensor([[0.5, 0.5, 3.0, 3.0]], dtype=torch.bfloat16) for _ in range(259)]
    out = fops.roi_align(x, boxes, 2, 1.0, 2, True)
    expected = tv_roi_align(x, torch.cat([torch.arange(259.0)[:, None], torch.cat(boxes).float()], 1), 2, 1.0, 2, True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_batch_index_truncates_toward_zero_like_torchvision():
    """torchvision casts the batch index to int: -0.5 and 0.9 both mean image 0."""
    x, rois = make_case(9200)
    shifted = rois.clone()
    shifted[:, 0] = torch.where(rois[:, 0] == 0, -0.5, rois[:, 0] + 0.9)
    torch.testing.assert_close(fops.roi_align(x, shifted, OUT, 1.0, 2, True),
                               fops.roi_align(x, rois, OUT, 1.0, 2, True), rtol=0, atol=0)


def test_native_op_rejects_narrowing_integers():
    x, rois = make_case(9300)
    with pytest.raises(RuntimeError, match="sampling_ratio must be at most 1024"):
        native.roi_align(x, rois, 1.0, 7, 7, 2**32 + 1, True)
    with pytest.raises(ValueError, match="sampling_ratio must be at most 1024"):
        fops.roi_align(x, rois, 7, 1.0, 2**31, True)


def test_synchronising_value_checks_of_the_cuda_path():
    """The checks set_input_checks(True) adds on CUDA are device-agnostic: run them on CPU tensors."""
    from fastdiffinst.ops._checks import check_roi_values

    rois = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0], [1.9, 0.0, 0.0, 3.0, 3.0], [-0.5, 2.0, 2.0, 4.0, 4.0]])
    check_roi_values("roi_align", rois, 2)  # valid, including indices truncated toward zero
    with pytest.raises(RuntimeError, match=r"rois\[1, 0\] is the batch index and must be in \[0, 1\)"):
        check_roi_values("roi_align", rois, 1)
    bad = rois.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(RuntimeError, match=r"rois must be finite, but rois\[2\]"):
        check_roi_values("roi_align", bad, 2)
