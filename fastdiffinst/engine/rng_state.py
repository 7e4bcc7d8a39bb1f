"""The global random generators' states (torch, CUDA, numpy, Python) as a checkpoint entry, in types
``torch.load(weights_only=True)`` accepts, and back. Training reseeds torch's global generator at
every iteration (dropout, drop-path) and draws everything else from its own generators, so exact
resume does not rest on these states; restoring them leaves the process as the saved one was for
anything else that draws from the global generators (docs/design.md §5)."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state() -> dict:
    """``{"torch", "numpy", "python", "cuda"}``: the states of the global generators."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict) -> None:
    """Sets the global generators to ``state`` (:func:`capture_rng_state`); the CUDA states only where
    they were saved and CUDA is available."""
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
