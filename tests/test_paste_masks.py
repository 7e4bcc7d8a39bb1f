"""paste_masks: the fused mask post-processing against the official chain
(fastdiffinst.reference.masks.paste_masks) and a float64 re-computation; edge boxes, bad input, the
op contract (opcheck, torch.compile, unwritten outputs, empty input: tests/op_contract.py), and
CUDA against CPU."""

from __future__ import annotations

import pytest
import torch

from fastdiffinst import ops
from fastdiffinst.reference import masks as reference
from op_contract import OpContract
from utils import deterministic_with_nan_fill, official_mask_probabilities64

# (Hm, Wm) stride-4 map, (h, w) unpadded image, (H, W) output: identity, up, down, odd/prime sizes.
CASES = [((16, 20), (61, 77), (61, 77)), ((16, 20), (64, 80), (131, 97)), ((16, 20), (61, 77), (23, 41)),
         ((7, 11), (25, 41), (29, 37)), ((1, 1), (3, 2), (5, 7)), ((32, 32), (128, 128), (480, 640))]


def _inputs(n, mask_size, output_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, *mask_size, generator=g)
    out_h, out_w = output_size
    scale = torch.tensor([out_w, out_h, out_w, out_h], dtype=torch.float32)
    corner = torch.rand(n, 2, generator=g) * 1.3 - 0.15           # some boxes start outside the image
    size = torch.rand(n, 2, generator=g) * 1.2
    boxes = torch.cat([corner, corner + size], dim=1) * scale
    return probs, boxes


def _assert_agrees(masks, probs, boxes, image_size, output_size, threshold=0.5):
    expected = reference.paste_masks(probs, boxes, image_size, output_size, threshold)
    assert masks.dtype == torch.bool and masks.shape == expected.shape
    differ = masks != expected
    # Only pixels whose probability is within rounding of the threshold may differ.
    near = (official_mask_probabilities64(probs, image_size, output_size) - threshold).abs() < 1e-5
    assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} pixels differ away from the threshold"
    return int(differ.sum())


@pytest.mark.parametrize("mask_size, image_size, output_size", CASES)
def test_matches_the_official_chain(mask_size, image_size, output_size):
    probs, boxes = _inputs(9, mask_size, output_size)
    masks = ops.paste_masks(probs, boxes, image_size, output_size)
    assert _assert_agrees(masks, probs, boxes, image_size, output_size) == 0
    assert masks.any()  # the case exercises something


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.8])
def test_thresholds(threshold):
    probs, boxes = _inputs(5, (16, 20), (100, 70), seed=1)
    masks = ops.paste_masks(probs, boxes, (61, 77), (100, 70), threshold=threshold)
    _assert_agrees(masks, probs, boxes, (61, 77), (100, 70), threshold)


@pytest.mark.parametrize("mask_stride", [1, 2, 3, 8])
@pytest.mark.parametrize("resize", [False, True])
def test_other_mask_strides(mask_stride, resize):
    """Models whose masks have another stride: mask_stride is the aligned upsampling factor."""
    mask_size, image_size = (9, 13), (9 * mask_stride - mask_stride // 2, 13 * mask_stride)
    output_size = (41, 53) if resize else image_size
    probs, boxes = _inputs(6, mask_size, output_size, seed=8)
    masks = ops.paste_masks(probs, boxes, image_size, output_size, mask_stride=mask_stride)
    expected = reference.paste_masks(probs, boxes, image_size, output_size, mask_stride=mask_stride)
    assert torch.equal(masks, expected)
    assert masks.any()


def test_edge_boxes():
    probs = torch.full((6, 8, 8), 0.9)
    boxes = torch.tensor([[-5.0, -5.0, 100.0, 100.0],   # covers everything
                          [10.0, 10.0, 5.0, 5.0],       # reversed: empty
                          [3.9, 2.2, 3.95, 9.0],        # narrower than a pixel: empty after truncation
                          [33.0, 0.0, 40.0, 10.0],      # entirely right of the image
                          [-0.5, -0.5, 0.5, 0.5],       # truncates to [0, 0): empty
                          [0.0, 0.0, 1.0, 1.0]])        # one pixel
    masks = ops.paste_masks(probs, boxes, (32, 32), (32, 32))
    assert masks[0].all() and not masks[1:5].any()
    assert masks[5].sum() == 1 and masks[5, 0, 0]
    _assert_agrees(masks, probs, boxes, (32, 32), (32, 32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_box_corners_truncate_in_their_own_dtype(dtype):
    """A corner just below an integer keeps its row/column: no rounding to fp32 first."""
    probs = torch.ones(2, 4, 4)
    boxes = torch.tensor([[0.0, 0.0, 4.99999999, 4.99999999], [0.0, 0.0, 5.0, 5.0]], dtype=dtype)
    masks = ops.paste_masks(probs, boxes, (16, 16), (16, 16))
    assert torch.equal(masks, reference.paste_masks(probs, boxes, (16, 16), (16, 16)))
    assert int(masks[0].sum()) == (16 if dtype == torch.float64 else 25) and int(masks[1].sum()) == 25


def test_compiles_with_inductor():
    probs, boxes = _inputs(3, (7, 11), (29, 37))
    compiled = torch.compile(lambda p, b: ops.paste_masks(p.sigmoid(), b, (25, 41), (29, 37)), fullgraph=True)
    assert torch.equal(compiled(probs, boxes), ops.paste_masks(probs.sigmoid(), boxes, (25, 41), (29, 37)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_compute_in_fp32_as_the_official_code(dtype):
    probs, boxes = _inputs(4, (16, 20), (70, 90), seed=2)
    probs, boxes = probs.to(dtype), boxes.to(dtype)
    masks = ops.paste_masks(probs, boxes, (61, 77), (70, 90))
    assert torch.equal(masks, reference.paste_masks(probs, boxes, (61, 77), (70, 90)))


def test_model_sized_case_matches():
    """Instances at the COCO test size, resized to an original 640x427 image."""
    probs, boxes = _inputs(40, (200, 304), (427, 640), seed=4)
    masks = ops.paste_masks(probs, boxes, (800, 1199), (427, 640))
    _assert_agrees(masks, probs, boxes, (800, 1199), (427, 640))


@pytest.mark.parametrize("call, error, message", [
    (lambda p, b: ops.paste_masks(p[0], b, (61, 77), (61, 77)), ValueError, "mask_probs must be"),
    (lambda p, b: ops.paste_masks(p.long(), b, (61, 77), (61, 77)), TypeError, "mask_probs must be a floating-point"),
    (lambda p, b: ops.paste_masks(p, b[:2], (61, 77), (61, 77)), ValueError, "boxes must be [n, 4] with n = 3"),
    (lambda p, b: ops.paste_masks(p, b.int(), (61, 77), (61, 77)), TypeError, "boxes must be a floating-point"),
    (lambda p, b: ops.paste_masks(p, b, (65, 77), (61, 77)), ValueError, "does not cover the 65x77 image"),
    (lambda p, b: ops.paste_masks(p, b, (61, 77), (0, 77)), ValueError, "output_size must be positive"),
    (lambda p, b: ops.paste_masks(p, b, (61.0, 77), (61, 77)), TypeError,
     "image_size must be an int or a pair of ints"),
    (lambda p, b: ops.paste_masks(p, b, (61, 77), (61, 77), threshold=float("nan")), ValueError,
     "threshold must be finite"),
    (lambda p, b: ops.paste_masks(p, b, (61, 77), (61, 77), threshold=float("inf")), ValueError,
     "threshold must be finite"),
    (lambda p, b: ops.paste_masks(p, b, (61, 77), (61, 77), threshold="0.5"), TypeError, "threshold must be a number"),
    (lambda p, b: ops.paste_masks(p, b, (61, 77), (61, 77), mask_stride=0), ValueError,
     "mask_stride must be a positive int"),
    (lambda p, b: ops.paste_masks(p, b, (61, 77), (61, 77), mask_stride=4.0), TypeError, "mask_stride must be an int"),
    (lambda p, b: ops.paste_masks(p, b, (61, 77), (61, 77), mask_stride=2), ValueError,
     "a 16x20 stride-2 map does not cover the 61x77 image"),
    (lambda p, b: ops.paste_masks(p, b.index_fill(0, torch.tensor([1]), float("nan")), (61, 77), (61, 77)),
     RuntimeError, "boxes must be finite"),
    (lambda p, b: torch.ops.fastdiffinst.paste_masks(p, b, 65, 77, 61, 77, 0.5), RuntimeError, "does not cover"),
    (lambda p, b: torch.ops.fastdiffinst.paste_masks(p.double(), b, 61, 77, 61, 77, 0.5), RuntimeError,
     "probs must be float32"),
    (lambda p, b: torch.ops.fastdiffinst.paste_masks(p, b, 61, 77, 61, 77, 0.5, 0), RuntimeError,
     "mask_stride must be a positive int"),
    (lambda p, b: torch.ops.fastdiffinst.paste_masks(p, b, 61, 77, 61, 77, 0.5, 3), RuntimeError,
     "stride-3 map does not cover"),
])
def test_bad_input_is_a_clear_error(call, error, message):
    probs, boxes = _inputs(3, (16, 20), (61, 77))
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(probs, boxes)


class TestPasteMasksContract(OpContract):
    """tests/op_contract.py on ``paste_masks`` against the official chain (bool masks, so exact;
    fresh bool outputs start True, so an unwritten pixel shows as a difference)."""

    op = "paste_masks"

    def make_inputs(self, variant):
        probs, boxes = _inputs(7, (16, 20), (90, 60), seed=3)
        return probs, boxes, (61, 77), (90, 60)

    def make_empty_inputs(self, variant):
        return torch.rand(0, 8, 8), torch.zeros(0, 4), (30, 30), (40, 50)

    def call(self, mask_probs, boxes, image_size, output_size):
        return ops.paste_masks(mask_probs, boxes, image_size, output_size)

    def reference(self, mask_probs, boxes, image_size, output_size):
        return reference.paste_masks(mask_probs, boxes, image_size, output_size)

    def opcheck_cases(self, backend, requires_grad):
        probs, boxes = _inputs(4, (7, 11), (29, 37))
        return [(torch.ops.fastdiffinst.paste_masks, args) for args in
                ((probs, boxes, 25, 41, 29, 37, 0.5), (probs[:0], boxes[:0], 25, 41, 29, 37, 0.5),
                 (probs, boxes, 19, 30, 29, 37, 0.5, 3))]


@pytest.mark.cuda
@pytest.mark.parametrize("mask_size, image_size, output_size", CASES)
def test_cuda_matches_cpu(mask_size, image_size, output_size):
    probs, boxes = _inputs(9, mask_size, output_size, seed=5)
    cpu = ops.paste_masks(probs, boxes, image_size, output_size)
    with deterministic_with_nan_fill():  # fresh bool outputs start True: an unwritten pixel shows
        cuda = ops.paste_masks(probs.cuda(), boxes.cuda(), image_size, output_size)
    assert cuda.device.type == "cuda"
    _assert_agrees(cuda.cpu(), probs, boxes, image_size, output_size)
    assert int((cuda.cpu() != cpu).sum()) <= int(cpu.numel() * 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("mask_stride", [1, 3, 8])
def test_cuda_other_mask_strides(mask_stride):
    mask_size, image_size, output_size = (9, 13), (9 * mask_stride - 1, 13 * mask_stride), (41, 53)
    probs, boxes = _inputs(6, mask_size, output_size, seed=9)
    cpu = ops.paste_masks(probs, boxes, image_size, output_size, mask_stride=mask_stride)
    with deterministic_with_nan_fill():
        cuda = ops.paste_masks(probs.cuda(), boxes.cuda(), image_size, output_size, mask_stride=mask_stride)
    assert int((cuda.cpu() != cpu).sum()) <= int(cpu.numel() * 1e-5)
