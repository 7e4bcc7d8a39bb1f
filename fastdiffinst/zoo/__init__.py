"""Models that ship with the package, loaded by name: ``load_model("tiny-synthetic")``,
``fastdiffinst eval --checkpoint tiny-synthetic``.

A named model is two files in this folder: ``NAME.pth``, a fastdiffinst model file whose weight
matrices and kernels are stored in fp16 (they load into an fp32 model), and ``NAME.json``, its card: the
recipe (commands and configuration), the commit it was trained at, its training curve and metrics, and
the predictions it made on a slice of validation images (the tests compare against them).
:mod:`fastdiffinst.zoo.export` writes both from a training run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).resolve().parent
# The model ``eval`` and ``demo`` use on the synthetic set when no --checkpoint is given.
SYNTHETIC_DEFAULT = "tiny-synthetic"


def names() -> list[str]:
    """The shipped models' names (those with both their weights and their card)."""
    return sorted(p.stem for p in FOLDER.glob("*.pth") if p.with_suffix(".json").is_file())


def model_path(name: str) -> Path:
    """The weights of the shipped model ``name``; ``FileNotFoundError`` naming the shipped ones
    otherwise (also when an installation lacks the files)."""
    if name not in names():
        raise FileNotFoundError(f"no shipped model named {name!r} in {FOLDER}; the shipped models are: "
                                f"{', '.join(names()) or 'none'}")
    return FOLDER / f"{name}.pth"


def card(name: str) -> dict[str, Any]:
    """The card of the shipped model ``name`` (see the module docstring)."""
    return json.loads(model_path(name).with_suffix(".json").read_text())


def resolve(path_or_name: str | os.PathLike) -> Path:
    """A model file's path: ``path_or_name`` itself when such a file exists (a user's file wins over
    a name), else the shipped model of that name, else ``path_or_name`` unchanged (reading it then
    reports the missing file)."""
    path = Path(path_or_name)
    if not path.exists() and str(path_or_name) in names():
        return model_path(str(path_or_name))
    return path


def demo_score_threshold(path_or_name: str | os.PathLike) -> float | None:
    """The score the demo draws a shipped model's instances from (its card's F1-best threshold on
    validation; an under-trained focal-loss model scores below detectron2's usual 0.5); None for a
    model file that is not a shipped one."""
    path = resolve(path_or_name)
    for name in names():
        if path == model_path(name):
            return float(card(name)["demo_score_threshold"])
    return None


def summary(name: str) -> str:
    """One line saying what the shipped model ``name`` is and how good, for the commands' output."""
    info = card(name)
    segm = info["metrics"]["segm"]
    return (f"the shipped model {name} ({info['description']}; segm AP {segm['AP']:.1f}, AP50 {segm['AP50']:.1f} "
            f"on {info['evaluation']['images']} {info['evaluation']['data']} validation images)")
