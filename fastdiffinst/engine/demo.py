"""Pictures of DiffusionInst's results (the ``demo`` command): masks blended in per-instance colours,
boxes, and a label "name 0.93" per instance scoring at least a threshold; optionally the ground
truth beside them.

* :func:`draw_instances` — one picture. The label font and the box lines are sized to the image;
  each label sits on a filled box of the instance's colour (black or white text, whichever reads
  better) just above the instance's box, or just below its top edge when there is no room above,
  shifted to stay inside the picture, and moved to the box's bottom edge when that keeps it clear
  of the labels of better-scoring instances (:func:`place_label`, :func:`label_rects`). Labels are
  drawn after every mask and box outline, the best score's last, so no outline crosses a label's
  text. Ground truth (instances without ``scores``) is labelled with the class name only.
* :func:`side_by_side` — the ground truth (left) and the predictions (right) in one picture.
* :func:`write_pictures` — the demo loop: one image at a time (read, predict, draw, save), with a
  progress bar; an image that cannot be read is reported ("skipped <path>: <reason>") and skipped.
"""

from __future__ import annotations

import colorsys
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from fastdiffinst.predictor import VIDEO_SUFFIXES, video_message

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_SCORE_THRESHOLD = 0.5  # detectron2's demo default
DEFAULT_ALPHA = 0.45


def _colour(index: int) -> tuple[int, int, int]:
    """Well-separated colours: golden-ratio steps around the hue circle."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light label backgrounds, white on dark ones."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def font_size(height: int, width: int) -> int:
    """Label text height in pixels for an image of ``height`` x ``width``: 3 % of the short side,
    10 to 64 px."""
    return int(min(64, max(10, round(0.03 * min(height, width)))))


def label_font(height: int, width: int):
    """PIL's built-in font at :func:`font_size` (Pillow >= 10.1 with FreeType); older or
    FreeType-less Pillows give their fixed bitmap font, and the labels are laid out by its size."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=font_size(height, width))
    except (TypeError, AttributeError, OSError, ImportError):  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _shown(instances: dict[str, Tensor], score_threshold: float) -> list[int]:
    """Indices of the instances drawn: those scoring >= the threshold, every one without scores."""
    if "scores" not in instances:
        return list(range(len(instances["boxes"])))
    return (instances["scores"] >= score_threshold).nonzero().flatten().tolist()


def _label_text(instances: dict[str, Tensor], i: int, class_names: Sequence[str]) -> str:
    label = int(instances["labels"][i])
    name = class_names[label] if 0 <= label < len(class_names) else str(label)
    return f"{name} {float(instances['scores'][i]):.2f}" if "scores" in instances else name


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Intersection area of two ``(left, top, right, bottom)`` rectangles."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def place_label(box: Sequence[float], label_size: tuple[int, int], image_size: tuple[int, int],
                taken: Sequence[tuple[int, ...]] = ()) -> tuple[int, ...]:
    """``(left, top, right, bottom)`` (right and bottom exclusive) of a label of ``label_size``
    ``(width, height)`` for the box ``(x1, y1, x2, y2)`` in an image of ``image_size`` ``(height,
    width)``. The first of these places that overlaps none of the labels ``taken`` (else the one
    overlapping them least): above the box's top-left corner (where there is room above), just
    below the box's top edge, below the box's bottom edge (where there is room below), just above
    the box's bottom edge. Each is moved left or up as far as needed to end inside the image; a
    label larger than the image starts at its left or top edge."""
    x1, y1, y2 = float(box[0]), float(box[1]), float(box[3])
    width, height = label_size
    image_h, image_w = image_size
    left = max(0, min(int(round(x1)), image_w - width))
    tops = [int(round(y1)) - height, int(round(y1)), int(round(y2)), int(round(y2)) - height]
    rects = [(left, top, left + width, top + height) for top in
             [max(0, min(top, image_h - height)) for top in tops[:2]]]
    if tops[2] + height <= image_h:
        rects.append((left, tops[2], left + width, tops[2] + height))
    bottom_inside = max(0, min(tops[3], image_h - height))
    rects.append((left, bottom_inside, left + width, bottom_inside + height))
    if tops[0] < 0:
        rects.pop(0)  # no room above
    costs = [sum(_overlap(rect, other) for other in taken) for rect in rects]
    return rects[costs.index(min(costs))]


def _shown_sorted(instances: dict[str, Tensor], score_threshold: float) -> list[int]:
    """:func:`_shown`, best score first (ground truth in its order)."""
    keep = _shown(instances, score_threshold)
    if "scores" in instances:
        scores = instances["scores"].tolist()
        keep.sort(key=lambda i: -scores[i])
    return keep


def label_rects(image_size: tuple[int, int], instances: dict[str, Tensor], class_names: Sequence[str],
                score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> list[tuple[str, tuple[int, ...]]]:
    """The ``(text, (left, top, right, bottom))`` of every label :func:`draw_instances` draws on
    an image of ``image_size`` ``(height, width)``, best score first: each placed by
    :func:`place_label` around the labels before it."""
    return [(text, rect) for text, rect, _, _ in _label_layout(image_size, instances, class_names, score_threshold)]


def _label_layout(image_size: tuple[int, int], instances: dict[str, Tensor], class_names: Sequence[str],
                  score_threshold: float) -> list[tuple[str, tuple[int, ...], tuple[int, int], object]]:
    """:func:`label_rects` with, for each label, where its text is drawn and the font: ``(text,
    rect, text origin, font)``, each text measured once."""
    from PIL import Image, ImageDraw

    font = label_font(*image_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(1, font_size(*image_size) // 8)
    labels: list[tuple[str, tuple[int, ...], tuple[int, int], object]] = []
    for i in _shown_sorted(instances, score_threshold):
        text = _label_text(instances, i, class_names)
        bx0, by0, bx1, by1 = measure.textbbox((0, 0), text, font=font)
        size = (bx1 - bx0 + 2 * pad, by1 - by0 + 2 * pad)
        left, top, right, bottom = place_label(instances["boxes"][i].tolist(), size, image_size,
                                               [rect for _, rect, _, _ in labels])
        labels.append((text, (left, top, right, bottom), (left + pad - bx0, top + pad - by0), font))
    return labels


def draw_instances(image: Tensor, instances: dict[str, Tensor], class_names: Sequence[str],
                   score_threshold: float = DEFAULT_SCORE_THRESHOLD, alpha: float = DEFAULT_ALPHA):
    """``image`` uint8 [3, H, W] with ``instances`` (``boxes`` [K, 4] xyxy, ``labels`` [K], ``masks``
    [K, H, W], and ``scores`` [K] for predictions — ground truth has none) drawn -> a PIL image.
    Predictions scoring below ``score_threshold`` are left out; ``alpha`` in [0, 1] is the masks'
    opacity."""
    from PIL import Image, ImageDraw

    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (the masks' opacity) must be in [0, 1], got {alpha}")
    height, width = int(image.shape[1]), int(image.shape[2])
    canvas = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    keep = _shown_sorted(instances, score_threshold)
    for rank, i in enumerate(keep):
        mask = instances["masks"][i].cpu().numpy().astype(bool)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.array(_colour(rank), dtype=np.float32)
    picture = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    line = max(2, round(min(height, width) / 300))
    for rank, i in enumerate(keep):
        x1, y1, x2, y2 = instances["boxes"][i].tolist()
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=_colour(rank), width=line)
    labels = list(enumerate(_label_layout((height, width), instances, class_names, score_threshold)))
    for rank, (text, (left, top, right, bottom), origin, font) in reversed(labels):  # the best label on top
        colour = _colour(rank)
        draw.rectangle([left, top, right - 1, bottom - 1], fill=colour)
        draw.text(origin, text, fill=_text_colour(colour), font=font)
    return picture


def side_by_side(left, right):
    """Two PIL pictures of the same height in one, ``left`` then ``right``."""
    from PIL import Image

    if left.height != right.height:
        raise ValueError(f"pictures side by side need the same height, got {left.height} and {right.height}")
    both = Image.new("RGB", (left.width + right.width, left.height))
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    return both


def image_files(path: Path) -> list[Path]:
    """``path`` itself or the images in the folder ``path`` (sorted); ``FileNotFoundError`` if none,
    ``ValueError`` for a video file."""
    if path.suffix.lower() in VIDEO_SUFFIXES and not path.is_dir():
        raise ValueError(video_message(path))
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            videos = sorted(p.name for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
            hint = (f" (video files such as {videos[0]} are not supported: extract their frames, e.g. "
                    f"ffmpeg -i {path / videos[0]} frames/%05d.png)") if videos else ""
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}{hint}")
        return files
    raise FileNotFoundError(f"input not found: {path}")


def picture_names(files: Sequence[Path]) -> list[str]:
    """Picture names (without ``.png``) for image files: the file's stem, or its whole name where
    two files share a stem (``a.jpg`` and ``a.png`` -> ``a.jpg``, ``a.png``)."""
    stems = [f.stem for f in files]
    return [f.name if stems.count(f.stem) > 1 else f.stem for f in files]


# One demo input: (picture name, the file it comes from or None, () -> (image, ground truth or None)).
DemoItem = tuple[str, Path | None, Callable[[], tuple[Tensor, dict[str, Tensor] | None]]]


def write_pictures(predictor, items: Iterable[DemoItem], total: int, out: Path, *,
                   score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                   alpha: float = DEFAULT_ALPHA, gt_class_names: Sequence[str] | None = None,
                   skip_unreadable: bool = True, progress: bool = True) -> tuple[int, int]:
    """Pictures of ``predictor``'s (:class:`fastdiffinst.predictor.Predictor`) results on ``items``,
    one at a time, as ``out/<name>.png`` (with the ground truth on the left where an item has one,
    labelled with ``gt_class_names``); ``(written, skipped)``. An item that cannot be read
    (:class:`~fastdiffinst.data.DatasetError`) is reported on stderr and skipped with
    ``skip_unreadable``, else raises. Lines go through the progress bar (stderr); with ``progress``
    off, skipped images are reported on stderr and pictures on stdout."""
    from fastdiffinst.data import DatasetError
    from fastdiffinst.progress import ProgressBar

    written = skipped = 0
    with ProgressBar(total, "demo", "img", enabled=progress) as bar:
        # Without the bar, skipped images are still reported (stderr), and each picture on stdout.
        warn = bar.write if progress else (lambda text: print(text, file=sys.stderr))
        say = bar.write if progress else print
        for name, source, load in items:
            target = out / f"{name}.png"
            try:
                if source is not None and target.resolve() == source.resolve():
                    raise DatasetError(f"its picture {target} would overwrite it (choose another --out)")
                image, truth = load()
            except DatasetError as error:
                if not skip_unreadable:
                    raise
                where = source if source is not None else name
                reason = str(error).removeprefix(f"cannot read image {where}: ")
                warn(f"skipped {where}: {reason}")
                skipped += 1
                bar.update()
                continue
            instances = predictor(image)
            picture = draw_instances(image, instances, predictor.class_names, score_threshold, alpha)
            if truth is not None:
                names = gt_class_names if gt_class_names is not None else predictor.class_names
                picture = side_by_side(draw_instances(image, truth, names, alpha=alpha), picture)
            picture.save(target)
            written += 1
            shown = int((instances["scores"] >= score_threshold).sum())
            say(f"{target}: {shown} instances (of {len(instances['scores'])}) at score >= {score_threshold}")
            bar.update()
    return written, skipped
