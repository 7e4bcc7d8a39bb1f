"""Inference on ordinary images in one call, as detectron2's ``DefaultPredictor``::

    from fastdiffinst.predictor import Predictor

    predictor = Predictor("runs/tiny/model_final.pth")      # or an official checkpoint + config="r50_coco"
    out = predictor("photo.jpg")                            # or a numpy / PIL / torch image
    out["boxes"], out["scores"], out["labels"], out["masks"]  # [K, 4] xyxy, [K], [K], [K, H, W] bool
    predictor.class_names[int(out["labels"][0])]
    outs = predictor([image1, image2, image3], batch_size=2)  # list in, list out

Every image is resized to the model's test size (shortest edge ``input.min_size_test``, longest at
most ``input.max_size_test``) and its results are reported at the image's own size
(:func:`predict_batch`, which the demo uses too).

Images: a file path (``str`` or ``Path``, read as RGB; a missing or unreadable file raises
:class:`~fastdiffinst.data.DatasetError`), a PIL image, a numpy ``uint8`` array ``[H, W, 3]`` (RGB;
``[H, W]`` or ``[H, W, 1]`` grayscale; ``[H, W, 4]`` RGBA, whose alpha is dropped), or a torch tensor
``[3, H, W]``, ``uint8`` or floating point with values in 0–255. Anything else raises a
``TypeError`` or ``ValueError`` naming the image (its index in a list), the shape or dtype found and
what was expected.

Randomness: DiffusionInst starts from random boxes. Each image's draws come from its own generator
seeded with ``seed``, so an image's results depend on the image and the seed only — not on the
images before it or on the batch it runs in. Batched results equal one-at-a-time results up to float
rounding (batched kernels); a batch pads its images to a common size, so images of different sizes
can give slightly different results batched than one at a time, as in detectron2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fastdiffinst.config import ModelConfig, replace_path
from fastdiffinst.data.transforms import resize_for_test
from fastdiffinst.modeling.sampler import DrawSource, GeneratorDraws

# Suffixes of video files, which are not read (torchvision's video reading needs PyAV).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


def video_message(path: str | os.PathLike) -> str:
    """Why a video file is refused, and how to get its frames as images."""
    return (f"{path} is a video file: video is not supported; extract its frames as images and pass the "
            f"folder, e.g. mkdir frames && ffmpeg -i {path} frames/%05d.png")


class PerImageDraws(DrawSource):
    """Random boxes for a batch where image ``b`` draws from its own generator seeded with
    ``seeds[b]``: each image gets the draws it would get alone (batch 1)."""

    ahead = True

    def __init__(self, seeds: Sequence[int], num_steps: int) -> None:
        self.sources = [GeneratorDraws(torch.Generator().manual_seed(int(seed)), num_steps) for seed in seeds]

    def initial(self, batch: int, num: int, device: torch.device) -> Tensor:
        if batch != len(self.sources):
            raise ValueError(f"{len(self.sources)} seeds for a batch of {batch} images")
        return torch.cat([source.initial(1, num, device) for source in self.sources])

    def step(self, step: int, keep: Tensor | None, state_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        parts = [source.step(step, keep, state_dtype) for source in self.sources]
        return torch.cat([noise for noise, _ in parts]), torch.cat([renew for _, renew in parts])


@torch.no_grad()
def predict_batch(model: nn.Module, images: Sequence[Tensor], generator: torch.Generator | None = None,
                  draws: DrawSource | None = None) -> list[dict[str, Tensor]]:
    """Instances of ``images`` (``[3, H, W]`` each, 0–255) resized to the model's test size, with
    results at each image's own size; random draws from ``draws`` or else ``generator``."""
    cfg = model.cfg.input
    resized = [resize_for_test(image, cfg.min_size_test, cfg.max_size_test) for image in images]
    sizes = [(int(image.shape[1]), int(image.shape[2])) for image in images]
    return model(resized, output_sizes=sizes, generator=generator, draws=draws)


def _from_array(array: np.ndarray, where: str) -> Tensor:
    """A numpy image (HWC RGB/RGBA, HW or HW1 grayscale, uint8) -> ``uint8 [3, H, W]``."""
    if array.dtype != np.uint8:
        raise TypeError(f"{where}: a numpy image must be uint8 (0-255), got {array.dtype}; convert 0-1 floats "
                        f"with (array * 255).round().astype(np.uint8)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        hint = "; for channels first use array.transpose(1, 2, 0)" if array.ndim == 3 and array.shape[0] in (1, 3) \
            else ""
        raise ValueError(f"{where}: a numpy image must be [H, W, 3] RGB, [H, W, 4] RGBA or [H, W] grayscale, "
                         f"got shape {tuple(array.shape)}{hint}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def _from_tensor(tensor: Tensor, where: str) -> Tensor:
    """A torch image ``[3, H, W]`` (uint8, or floating point in 0-255) -> itself, checked."""
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        if tensor.dim() == 3 and tensor.shape[2] == 3:
            hint = "; for channels last use tensor.permute(2, 0, 1)"
        elif tensor.dim() == 4:
            hint = "; pass a batch as a list of images"
        else:
            hint = ""
        raise ValueError(f"{where}: a tensor image must be [3, H, W] (RGB, channels first), "
                         f"got shape {tuple(tensor.shape)}{hint}")
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise TypeError(f"{where}: a tensor image must be uint8 or floating point (0-255), got {tensor.dtype}")
    return tensor  # its values are checked by the model with the batch (DiffusionInst.preprocess)


def to_image(image: object, where: str = "image") -> Tensor:
    """Any image the :class:`Predictor` takes (see the module docstring) -> ``[3, H, W]`` (uint8,
    or the floating-point tensor given); ``where`` names it in error messages."""
    from PIL import Image

    from fastdiffinst.data.coco import read_image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.suffix.lower() in VIDEO_SUFFIXES:
            raise ValueError(video_message(path))
        tensor = read_image(path)
    elif isinstance(image, Image.Image):
        tensor = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    elif isinstance(image, np.ndarray):
        tensor = _from_array(image, where)
    elif isinstance(image, Tensor):
        tensor = _from_tensor(image, where)
    else:
        raise TypeError(f"{where}: expected a file path, a PIL image, a numpy array or a torch tensor, "
                        f"got {type(image).__name__}")
    if tensor.shape[1] < 1 or tensor.shape[2] < 1:
        raise ValueError(f"{where} is empty: {tensor.shape[1]}x{tensor.shape[2]} pixels")
    return tensor


class Predictor:
    """A model ready for inference on ordinary images (see the module docstring).

    Args:
        model_or_path: a :class:`~fastdiffinst.modeling.DiffusionInst` (put in eval mode, moved to
            ``device`` and given ``steps`` in place), the path of a fastdiffinst model file, a shipped
            model's name (``"tiny-synthetic"``, :mod:`fastdiffinst.zoo`), or an official checkpoint
            (with ``config``).
        config: the configuration of an official checkpoint: a preset (e.g. ``"r50_coco"``), a
            YAML/JSON file or a :class:`~fastdiffinst.config.ModelConfig`.
        device: where the model runs (default: the model's device; for a path, CUDA when available).
        ops_impl: ``"fused"`` or ``"reference"`` (for a path).
        steps: DDIM sampling steps (default: the model's configuration).
        seed: seed of every image's random boxes.
        class_names: the class names of a model given as a module (default ``class 0``, ...).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (set on the model; default: a model given as
            a module keeps its own, a loaded one is fp32). See :mod:`fastdiffinst.modeling.precision`.
    """

    def __init__(self, model_or_path: nn.Module | str | os.PathLike, *,
                 config: str | os.PathLike | ModelConfig | None = None, device: str | torch.device | None = None,
                 ops_impl: str = "fused", steps: int | None = None, seed: int = 0,
                 class_names: Sequence[str] | None = None, precision: str | None = None) -> None:
        if isinstance(model_or_path, nn.Module):
            model = model_or_path if device is None else model_or_path.to(device)
            names = list(class_names) if class_names is not None else \
                [f"class {i}" for i in range(model.cfg.num_classes)]
        elif isinstance(model_or_path, (str, os.PathLike)):
            from fastdiffinst.checkpoint import load_model

            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model, names = load_model(model_or_path, config, ops_impl, device)
            if class_names is not None:
                names = list(class_names)
        else:
            raise TypeError(f"model_or_path must be a DiffusionInst or a checkpoint path, "
                            f"got {type(model_or_path).__name__}")
        if len(names) != model.cfg.num_classes:
            raise ValueError(f"{len(names)} class names for a model of {model.cfg.num_classes} classes")
        if steps is not None:
            model.cfg = replace_path(model.cfg, "sampler.sample_steps", steps)
        if precision is not None:
            model.set_precision(precision)
        self.model = model.eval()
        self.class_names: list[str] = names
        self.seed = int(seed)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, images, batch_size: int = 4):
        """One image -> its instances ``{"boxes", "scores", "labels", "masks"}``; a list or tuple of
        images -> a list of them, run ``batch_size`` images at a time."""
        if not isinstance(images, (list, tuple)):
            return self._run([to_image(images)])[0]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        results: list[dict[str, Tensor]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            results += self._run([to_image(image, f"images[{start + i}]") for i, image in enumerate(chunk)])
        return results

    def _run(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        draws = PerImageDraws([self.seed] * len(images), self.model.cfg.sampler.sample_steps)
        return predict_batch(self.model, images, draws=draws)
