"""Pictures of DiffusionInst's results: masks blended in per-instance colours, boxes, and the
label with its score, for the instances scoring at least a threshold."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastdiffinst.data.transforms import resize_for_test

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _colour(index: int) -> tuple[int, int, int]:
    """Well-separated colours: golden-ratio steps around the hue circle."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(image: Tensor, instances: dict[str, Tensor], class_names: list[str],
                   score_threshold: float = 0.5, alpha: float = 0.45):
    """``image`` uint8 [3, H, W] with the instances drawn -> a PIL image."""
    from PIL import Image, ImageDraw

    canvas = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    keep = (instances["scores"] >= score_threshold).nonzero().flatten().tolist()
    for rank, i in enumerate(keep):
        mask = instances["masks"][i].cpu().numpy()
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.array(_colour(rank), dtype=np.float32)
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for rank, i in enumerate(keep):
        x1, y1, x2, y2 = instances["boxes"][i].tolist()
        colour = _colour(rank)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        label = int(instances["labels"][i])
        text = f"{class_names[label] if label < len(class_names) else label} {float(instances['scores'][i]):.2f}"
        left, top, right, bottom = draw.textbbox((x1 + 2, y1 + 1), text)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((x1 + 2, y1 + 1), text, fill=(0, 0, 0))
    return picture


def image_files(path: Path) -> list[Path]:
    """``path`` itself or the images in the folder ``path`` (sorted); ``FileNotFoundError`` if none."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
        return files
    raise FileNotFoundError(f"input not found: {path}")


@torch.no_grad()
def predict_image(model: torch.nn.Module, image: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One image at the model's test size, results at the image's own size."""
    cfg = model.cfg.input
    resized = resize_for_test(image, cfg.min_size_test, cfg.max_size_test)
    return model([resized], output_sizes=[(int(image.shape[1]), int(image.shape[2]))], generator=generator)[0]
