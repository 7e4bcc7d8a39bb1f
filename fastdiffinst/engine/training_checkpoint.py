"""Training checkpoints (``last.pth``, ``best.pth``): a fastdiffinst model file
(:func:`fastdiffinst.checkpoint.save_model`, written atomically, so a killed run never leaves a torn
file) with the training state beside the model — optimizer, LR scheduler, gradient scaler,
iteration, best segm AP, the global RNG states and the run's options — so that a resumed run ends
in the state of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fastdiffinst.checkpoint import CheckpointError, save_model
from fastdiffinst.config import ModelConfig, config_to_dict
from fastdiffinst.engine.config_diff import config_differences
from fastdiffinst.engine.rng_state import capture_rng_state, restore_rng_state


class ResumePoint(NamedTuple):
    """Where a resumed run continues."""

    iteration: int
    best_segm_ap: float


class TrainingCheckpoints:
    """The checkpoints of one run in ``folder``: saves and restores ``module`` and the optimizer,
    scheduler and gradient scaler in place; ``options`` (what the run was started with besides the
    configuration) are stored for reference."""

    def __init__(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                 class_names: list[str], options: dict) -> None:
        self.folder, self.module, self.class_names, self.options = folder, module, class_names, options
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler

    def save(self, name: str, iteration: int, best_segm_ap: float) -> None:
        """Writes ``folder/name`` (the global RNG states as they are now)."""
        extra = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "iteration": iteration, "best_segm_ap": best_segm_ap,
                 "rng": capture_rng_state(), "options": self.options}
        save_model(self.module, self.folder / name, self.class_names, extra)

    def resume(self, name: str, cfg: ModelConfig, device: torch.device) -> ResumePoint:
        """Restores everything ``folder/name`` holds, global RNG states included; ``CheckpointError``
        when it is missing or was written by a run of another configuration than ``cfg``."""
        path = self.folder / name
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=device, weights_only=True)
        differences = config_differences(state["config"], config_to_dict(cfg))
        if differences:
            raise CheckpointError(f"--resume: {path} is a run of another configuration:\n  " + "\n  ".join(differences))
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        return ResumePoint(state["iteration"], state["best_segm_ap"])
