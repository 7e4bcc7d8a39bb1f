"""Official checkpoints and ImageNet backbone weights (docs/official-model.md §9). Nothing is downloaded.

* :func:`convert_official` maps an official DiffusionInst (detectron2) state dict onto
  :class:`fastdiffinst.modeling.DiffusionInst`: the mask branch moves from ``head.`` to
  ``mask_branch.``; the 12 float64 schedule buffers are checked against the cosine schedule we
  regenerate, then dropped (the model keeps its schedule outside the state dict). Everything else —
  the packed ``in_proj`` of the attention, the ``[P1 | P2]`` layout of ``dynamic_layer``, FrozenBN
  buffers, ResNet/Swin ``bottom_up.*`` names — already has our layout.
* :func:`load_official` converts and loads strictly; a checkpoint of another configuration raises
  with the missing, unexpected and mis-shaped keys listed.
* :func:`load_backbone_weights` loads ImageNet weights into the backbone from a torchvision
  ``.pth`` (``conv1``, ``layer1.0.bn1``, ...) or a detectron2-named pickle (``stem.conv1``,
  ``res2.0.conv1.norm``, ...). Caffe2-style names (``res2_0_branch2a_w``) are rejected.

``.pkl`` files are Python pickles (detectron2's format) and can execute code when loaded: load only
files you trust. ``.pth`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from fastdiffinst.common.diffusion import cosine_schedule

if TYPE_CHECKING:
    from fastdiffinst.config import ModelConfig

SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
# Official prefix -> ours, first match wins.
_RENAMES = (("head.mask_refine.", "mask_branch.mask_refine."), ("head.mask_head.", "mask_branch.mask_head."))


def official_to_ours(name: str) -> str:
    """The name of an official parameter or buffer in our model."""
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or the expected format."""


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive


def _describe_contents(path: str) -> str:
    """What a file that cannot be read as a checkpoint holds, for the error message."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(64)
    size = os.path.getsize(path)
    if not head:
        return "an empty file"
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path):  # reads the central directory at the end: fails when truncated
                pass
        except (zipfile.BadZipFile, OSError):
            return f"a damaged or truncated torch archive ({size} bytes)"
        return ("a torch archive holding Python objects besides tensors and plain containers (a whole model "
                "saved with torch.save(model)?), which are not loaded because unpickling them can run code")
    if head[0] == 0x80:  # the PROTO opcode that starts every pickle of protocol >= 2
        return f"a pickle that cannot be read ({size} bytes)"
    text = head.decode("utf-8", errors="replace").strip()
    if text.isprintable():
        return f"text starting with {text[:40]!r}"
    return f"{size} bytes of unrecognised binary data"


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The object stored in a checkpoint file: ``.pkl`` through :mod:`pickle` (detectron2's format),
    anything else through ``torch.load(weights_only=True)``. ``FileNotFoundError`` when there is no
    such file; :class:`CheckpointError` naming the path and what it holds when it cannot be read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unpickling foreign or damaged bytes can raise nearly any exception type
        raise CheckpointError(f"{path} is not a fastdiffinst or detectron2 checkpoint: found "
                              f"{_describe_contents(path)}") from None


def _state_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Tensor]:
    """A flat ``name -> Tensor`` dict from a path, a checkpoint dict (detectron2 ``{"model": ...}``,
    Detectron ``{"blobs": ...}``) or a state dict; numpy arrays (pickles) become tensors and
    metadata entries (``__author__``, ``matching_heuristics``, ...) are skipped."""
    data = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the checkpoint"
    for wrapper in ("model", "state_dict", "blobs"):
        if isinstance(data, Mapping) and isinstance(data.get(wrapper), Mapping):
            data = data[wrapper]
            break
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{where} is not a fastdiffinst or detectron2 checkpoint: found a "
                              f"{type(data).__name__}, not a state dict")
    out = {}
    for name, value in data.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, Tensor):
            out[name] = value
        elif not isinstance(value, (str, bytes, bool, int, float, type(None))):
            raise CheckpointError(f"{where}: entry {name!r} is neither a tensor nor metadata "
                                  f"(got {type(value).__name__})")
    if not out:
        raise CheckpointError(f"{where} holds no tensors")
    return out


def convert_official(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Tensor]:
    """An official DiffusionInst state dict (or checkpoint path / dict) -> our state dict.

    Raises :class:`CheckpointError` when the schedule buffers differ from the cosine schedule.
    """
    state = _state_dict(source)
    if any(k.startswith("module.") for k in state):
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    schedule = cosine_schedule()
    out = {}
    for name, value in state.items():
        if name in SCHEDULE_BUFFERS:
            expected = getattr(schedule, name)
            if value.shape != expected.shape or not torch.allclose(value.double(), expected, rtol=1e-9, atol=1e-12):
                raise CheckpointError(f"schedule buffer {name!r} differs from the cosine schedule (T = 1000) this "
                                      f"implementation uses")
            continue
        out[official_to_ours(name)] = value
    return out


def load_into(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with one error that lists every missing,
    unexpected and mis-shaped key."""
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise CheckpointError(f"{what}: entries that are not tensors: {', '.join(map(str, not_tensors[:5]))}"
                              + (f" and {len(not_tensors) - 5} more" if len(not_tensors) > 5 else ""))
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        def listing(title: str, items: list[str]) -> str:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""

        raise CheckpointError(f"{what} does not match the model (a checkpoint of another configuration?)"
                              + listing("missing keys", missing) + listing("unexpected keys", unexpected)
                              + listing("shape mismatches", shapes))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_official(model: nn.Module, source: Mapping[str, Any] | str | os.PathLike) -> None:
    """Loads an official DiffusionInst checkpoint into ``model`` strictly (see :func:`convert_official`)."""
    load_into(model, convert_official(source), "the official checkpoint")


# ------------------------------------------------------------------------------------------------
# ImageNet backbone weights

_CAFFE2 = re.compile(r"(^|\.)(conv1_w|res_conv1_bn_[sb]|res\d_\d+_branch\d[abc]?_(w|bn_[sb]))$")


def _torchvision_to_detectron2(name: str) -> str | None:
    """torchvision ResNet names -> detectron2's (``None`` for the classifier and BN counters)."""
    if name.startswith("fc.") or name.endswith("num_batches_tracked"):
        return None
    name = re.sub(r"^conv1\.", "stem.conv1.", name)
    name = re.sub(r"^bn1\.", "stem.conv1.norm.", name)
    name = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", name)
    name = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", name)
    name = re.sub(r"\.downsample\.0\.", ".shortcut.", name)
    name = re.sub(r"\.downsample\.1\.", ".shortcut.norm.", name)
    return name


def backbone_state_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Tensor]:
    """ImageNet weights -> the names of our ``bottom_up`` backbone (detectron2's)."""
    state = _state_dict(source)
    if any(_CAFFE2.search(k) for k in state):
        raise CheckpointError("these are Caffe2-style weights (names like 'res2_0_branch2a_w'); convert them to "
                              "torchvision or detectron2 names first (e.g. load a torchvision .pth instead)")
    if any(k.startswith("layer1.") for k in state):
        return {new: v for k, v in state.items() if (new := _torchvision_to_detectron2(k)) is not None}
    for prefix in ("backbone.bottom_up.", "bottom_up."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def load_backbone_weights(model: nn.Module, source: Mapping[str, Any] | str | os.PathLike) -> None:
    """Loads ImageNet weights into ``model.backbone.bottom_up`` strictly (FPN, mask branch and head
    keep their initialisation)."""
    load_into(model.backbone.bottom_up, backbone_state_dict(source), "the backbone weights")


# ------------------------------------------------------------------------------------------------
# Our model files

MODEL_FORMAT = "fastdiffinst-model"
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Creates ``folder`` and checks that files can be written in it (``OSError`` naming it)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write to the output folder {folder}: {error.strerror or error}") from None
    return folder


TEMPORARY_PREFIX = ".tmp-"  # atomic_save's temporary files: ".tmp-<random>.pth" beside the target


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files that atomic writes (:func:`atomic_save`'s ``.tmp-*.pth``, the
    metrics log's ``.tmp-metrics.jsonl``) leave in ``folder`` when their process is killed mid-write
    (a kill skips their clean-up); returns what was deleted. Call it only from the one process that
    writes in the folder (a run's rank 0), between its writes, so that none of them is in use."""
    folder = Path(folder)
    candidates = [*folder.glob(f"{TEMPORARY_PREFIX}*.pth"), folder / f"{TEMPORARY_PREFIX}metrics.jsonl"]
    stale = sorted(path for path in candidates if path.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename: ``path`` is
    either the old file or the complete new one, never half-written."""
    import tempfile

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=".pth")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_model(model: nn.Module, path: str | os.PathLike, class_names: list[str] | None = None,
               extra: Mapping[str, Any] | None = None) -> None:
    """Writes ``model`` (weights + configuration + class names) to ``path`` atomically; ``extra``
    entries (e.g. training state) are stored beside them."""
    from fastdiffinst.config import config_to_dict

    payload = {"format": MODEL_FORMAT, "version": 1, "config": config_to_dict(model.cfg),
               "model": model.state_dict(), "class_names": list(class_names) if class_names is not None else None}
    payload.update(extra or {})
    atomic_save(payload, path)


def stored_config(data: Mapping[str, Any], path: str | os.PathLike) -> ModelConfig:
    """The configuration a model file or training checkpoint ``data`` (read from ``path``) holds,
    fields added since it was written at their defaults; ``CheckpointError`` if it is missing or
    not valid."""
    from fastdiffinst.config import config_from_dict

    try:
        return config_from_dict(data["config"])
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: the stored configuration is not valid: {error}") from None


def load_model(path: str | os.PathLike, config: str | os.PathLike | ModelConfig | None = None,
               ops_impl: str = "fused", device: str | torch.device = "cpu") -> tuple[nn.Module, list[str]]:
    """``(model in eval mode, class names)`` from our model file, a shipped model's name (e.g.
    ``"tiny-synthetic"``, see :mod:`fastdiffinst.zoo`), or an official DiffusionInst checkpoint with
    ``config`` naming its configuration: a preset (e.g. ``"r50_coco"``), a YAML/JSON file
    (:func:`fastdiffinst.config_files.load_config`) or a loaded :class:`~fastdiffinst.config.ModelConfig`."""
    from fastdiffinst.config_files import load_config
    from fastdiffinst.modeling import DiffusionInst
    from fastdiffinst.zoo import names as shipped_names
    from fastdiffinst.zoo import resolve

    path = resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path} (the shipped models, loaded by name: "
                                f"{', '.join(shipped_names()) or 'none'})")
    data = read_checkpoint(path)
    if isinstance(data, Mapping) and data.get("format") == MODEL_FORMAT:
        if not isinstance(data.get("model"), Mapping):
            raise CheckpointError(f"{path}: a fastdiffinst model file without its 'model' state dict")
        model = DiffusionInst(stored_config(data, path), ops_impl=ops_impl)
        load_into(model, data["model"], f"{path}")
        names = data.get("class_names")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise CheckpointError(f"{path}: 'class_names' must be a list of strings, got {names!r:.100}")
    else:
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{path} is not a fastdiffinst or detectron2 checkpoint: found a "
                                  f"{type(data).__name__}, not a state dict")
        if config is None:
            raise CheckpointError(f"{path} is not a fastdiffinst model file: for an official DiffusionInst checkpoint "
                                  f"name its configuration (--config r50_coco, r101_coco, swinb_coco, r50_lvis, ...)")
        model = DiffusionInst(load_config(config), ops_impl=ops_impl)
        try:
            load_official(model, data)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
        names = list(COCO_CLASSES) if model.cfg.num_classes == len(COCO_CLASSES) else None
    names = list(names) if names else [f"class {i}" for i in range(model.cfg.num_classes)]
    if len(names) != model.cfg.num_classes:
        raise CheckpointError(f"{path}: {len(names)} class names for {model.cfg.num_classes} classes")
    return model.to(device).eval(), names
