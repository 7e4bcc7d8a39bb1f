"""Mask-pasting study: :func:`fastdiffinst.ops.paste_masks` vs the official chain
(``aligned_bilinear`` ×4, crop, bilinear resize, threshold, box clip), each in the chunks the model
uses (``OpsImplementation.mask_chunk_size``: 13-20 instances here for the official chain, whose full-resolution
temporaries bound them; 55-129 for the fused op, whose chunks are then copied into the result), on
the same stride-4 probabilities and boxes (docs/design.md §7).

One 800×1199 test image (mask map 200×304) with N instances, boxes log-uniform as detections
(``roi_align_study.detection_boxes``): pasted at the model's size (no resize) and resized to the
original 427×640 image, as COCO evaluation does. Quick: N = 100; full adds N = 300; smoke (tests):
N = 5 on a 64×96 image. Throughput: bytes written (the bool masks) and read (the map) over the
time, against the copy bandwidth of the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.harness import comparison_row, rate_note, time_fn
from benchmarks.roi_align_study import detection_boxes
from fastdiffinst.modeling.implementation import FUSED, REFERENCE
from fastdiffinst.modeling.postprocess import paste_in_chunks


@dataclass(frozen=True)
class Sizes:
    image: tuple[int, int]
    original: tuple[int, int]
    instances: tuple[int, ...]
    repeats: int
    warmup: int = 2


PROFILES = {"smoke": Sizes((64, 96), (40, 60), (5,), 1, 0), "quick": Sizes((800, 1199), (427, 640), (100,), 5),
            "full": Sizes((800, 1199), (427, 640), (100, 300), 5)}
def run(device: str, profile: str, progress, ceilings: dict) -> list[dict]:
    sizes = PROFILES[profile]
    generator = torch.Generator().manual_seed(0)
    height, width = sizes.image
    mask_size = (-(-height // 32) * 8, -(-width // 32) * 8)   # padded to 32, stride 4
    rows = []
    for n in sizes.instances:
        probs = torch.rand(n, *mask_size, generator=generator).to(device)
        image_boxes = detection_boxes(n, generator, sizes.image)
        for output in (sizes.image, sizes.original):
            scale = torch.tensor([output[1] / width, output[0] / height] * 2)
            boxes = (image_boxes * scale).clamp(min=0)
            boxes = torch.minimum(boxes, torch.tensor([output[1], output[0]] * 2)).to(device)
            chunks = {impl: impl.mask_chunk_size(mask_size, output) for impl in (FUSED, REFERENCE)}

            def ours(probs=probs, boxes=boxes, chunk=chunks[FUSED], output=output):
                return paste_in_chunks(FUSED.paste_masks, lambda s, e: probs[s:e], boxes, chunk, sizes.image, output)

            def official(probs=probs, boxes=boxes, chunk=chunks[REFERENCE], output=output):
                return paste_in_chunks(REFERENCE.paste_masks, lambda s, e: probs[s:e], boxes, chunk, sizes.image,
                                       output)

            differ = int((ours() != official()).sum())
            t_ours = time_fn(ours, device, sizes.repeats, sizes.warmup)
            progress.update(1)
            t_base = time_fn(official, device, sizes.repeats, sizes.warmup)
            progress.update(1)
            traffic = n * output[0] * output[1] + probs.numel() * 4
            achieved = traffic / t_ours.median_s / 1e9
            what = "no resize" if output == sizes.image else f"resized to {output[0]}x{output[1]}"
            rows.append(comparison_row(
                "paste_masks", "paste_masks", f"N={n} {height}x{width} {what}", "forward",
                f"official chain (chunks of {chunks[REFERENCE]})", t_ours, t_base, n=n,
                ours_rate=rate_note(achieved, "GB/s", ceilings["copy_GBps"], "copy"), achieved_GBps=achieved,
                max_abs_diff=f"ours in chunks of {chunks[FUSED]}; "
                             f"{differ} of {n * output[0] * output[1]} pixels differ"))
    return rows


def steps(profile: str) -> int:
    """Timed measurements, for the progress bar."""
    return 4 * len(PROFILES[profile].instances)
