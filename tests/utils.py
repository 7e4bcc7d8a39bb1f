"""Shared test utilities: dtype tolerances, float64-reference comparison, deterministic guards,
random boxes."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiffinst.common.upsampling import aligned_bilinear

# Tolerances against a float64 reference computed on the same (rounded) inputs (docs/design.md §6).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # dtype -> (rtol, atol)
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def tolerance(dtype: torch.dtype, reduce_len: int = 1) -> dict[str, float]:
    """rtol/atol for ``dtype``; atol grows with sqrt of the reduction length (weight gradients)."""
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol * math.sqrt(max(reduce_len, 1))}


def assert_close_to_f64(actual: Tensor, expected_f64: Tensor, reduce_len: int = 1, msg: str = "") -> None:
    """``actual`` (any dtype) against a float64 reference, with ``actual.dtype``'s tolerance."""
    assert expected_f64.dtype == torch.float64, "the reference must be computed in float64"
    torch.testing.assert_close(actual.double(), expected_f64, **tolerance(actual.dtype, reduce_len),
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


@contextlib.contextmanager
def deterministic_with_nan_fill() -> Iterator[None]:
    """Deterministic algorithms with fresh outputs filled (NaN for floats, True for bools), so
    unwritten elements show up."""
    import torch.utils.deterministic as det

    previous = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        det.fill_uninitialized_memory = previous[1]


def runs_at_two_thread_counts(fn):
    """``fn()`` twice with 2 threads and once with 1: results that must be bitwise equal when the
    kernels do not depend on the thread count. Restores the thread count."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = fn(), fn()
        torch.set_num_threads(1)
        single = fn()
    finally:
        torch.set_num_threads(threads)
    return first, second, single


def random_boxes(n: int, width: float, height: float, min_size: float = 1.0, max_size: float | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` xyxy boxes with log-uniform side lengths, centres anywhere in the image (so some stick
    out of it). -> [n, 4]."""
    max_size = max_size or max(width, height)
    size = torch.exp(torch.empty(n, 2, dtype=torch.float64).uniform_(math.log(min_size), math.log(max_size),
                                                                      generator=generator))
    centre = torch.rand(n, 2, dtype=torch.float64, generator=generator) * torch.tensor([width, height])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1).to(dtype)


def with_batch_index(boxes: Tensor, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """[K, 4] boxes -> [K, 5] rois with a random batch index in [0, batch_size)."""
    index = torch.randint(0, batch_size, (boxes.shape[0], 1), generator=generator).to(boxes.dtype)
    return torch.cat([index, boxes], dim=1)


def edge_case_boxes(width: float, height: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Hand-picked xyxy boxes for a ``width`` x ``height`` image that exercise RoIAlign's edge rules:
    partly and fully outside each side, zero width / height, a point, reversed corners, the whole
    image, a sub-pixel box and boxes hugging the border. -> [13, 4]."""
    w, h = float(width), float(height)
    return torch.tensor([
        [-3.0, -2.0, 0.4 * w, 0.5 * h],                # partly outside, top-left
        [0.6 * w, 0.55 * h, w + 4.0, h + 3.0],          # partly outside, bottom-right
        [w + 2.0, 1.0, w + 9.0, 0.5 * h],              # fully outside, right
        [-9.0, -7.0, -2.0, -1.5],                      # fully outside, top-left
        [1.0, h + 1.5, 0.5 * w, h + 6.0],              # fully outside, below
        [0.3 * w, 0.2 * h, 0.3 * w, 0.7 * h],          # zero width
        [0.1 * w, 0.4 * h, 0.8 * w, 0.4 * h],          # zero height
        [0.7 * w, 0.2 * h, 0.2 * w, 0.6 * h],          # x2 < x1
        [0.2 * w, 0.8 * h, 0.6 * w, 0.1 * h],          # y2 < y1
        [0.5 * w, 0.5 * h, 0.5 * w, 0.5 * h],          # a point
        [0.0, 0.0, w, h],                              # the whole image
        [0.25 * w, 0.3 * h, 0.25 * w + 0.3, 0.3 * h + 0.2],  # sub-pixel
        [w - 1.0, h - 1.0, w, h],                      # the last pixel
    ], dtype=torch.float64).to(dtype)


def nan_count(*tensors: Tensor) -> int:
    """Total number of NaN elements in ``tensors``."""
    return sum(int(torch.isnan(t).sum()) for t in tensors)


def rois_from_list(boxes: Tensor | list[Tensor]) -> Tensor:
    """A list of per-image [k, 4] boxes as [K, 5] rois, the image index first (an independent
    re-implementation of what the RoI ops do with such a list); a tensor is returned as it is."""
    if isinstance(boxes, Tensor):
        return boxes
    return torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1) for i, b in enumerate(boxes)])


def reversed_boxes(rois: Tensor) -> Tensor:
    """Rows with x2 < x1 or y2 < y1."""
    return (rois[:, 3] < rois[:, 1]) | (rois[:, 4] < rois[:, 2])


def torchvision_roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size, spatial_scale: float = 1.0,
                          sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` as the oracle, with one gap filled: with ``aligned=True`` and an
    adaptive grid (sampling_ratio <= 0) a box with exactly one reversed side makes torchvision's CPU
    kernel size a vector by a negative grid and throw. Its grid is empty, so the bins are 0 (which
    is what torchvision itself returns when both sides are reversed); those rows are filled with 0."""
    import torchvision

    rois = rois_from_list(boxes)
    if not (aligned and sampling_ratio <= 0):
        return torchvision.ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    keep = ~reversed_boxes(rois)
    kept = torchvision.ops.roi_align(input, rois[keep], output_size, spatial_scale, sampling_ratio, aligned)
    out = kept.new_zeros((rois.shape[0], *kept.shape[1:]))
    return out.index_put((keep.nonzero().squeeze(1),), kept)


def assert_same_training_step(model_a, model_b, images, targets, seed: int, loss_tol: tuple[float, float],
                              grad_rel_l2: float) -> None:
    """The same losses (rtol, atol) and gradients (relative L2 per parameter) from one training
    forward + backward of two models on the same batch and draws."""
    a = model_a(images, targets, generator=torch.Generator().manual_seed(seed))
    b = model_b(images, targets, generator=torch.Generator().manual_seed(seed))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=loss_tol[0], atol=loss_tol[1], msg=name)
    sum(a.values()).backward()
    sum(b.values()).backward()
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        if p.grad is not None:
            error = float((q.grad - p.grad).norm() / p.grad.norm().clamp(min=1e-12))
            assert error <= grad_rel_l2, f"{name}: relative L2 {error:.2e} > {grad_rel_l2}"


def official_mask_probabilities64(probs: Tensor, image_size: tuple[int, int], output_size: tuple[int, int]) -> Tensor:
    """The official mask-pasting chain in float64 (aligned ×4 upsampling, crop to ``image_size``,
    bilinear resize to ``output_size``): the probability of every output pixel, ``[n, H, W]``, before
    the threshold and the box clip."""
    full = aligned_bilinear(probs[:, None].double(), 4)[:, :, :image_size[0], :image_size[1]]
    if tuple(output_size) != tuple(image_size):
        full = F.interpolate(full, size=tuple(output_size), mode="bilinear", align_corners=False)
    return full[:, 0]
