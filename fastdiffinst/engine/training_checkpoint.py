"""Training checkpoints (``last.pth``, ``best.pth``): a fastdiffinst model file
(:func:`fastdiffinst.checkpoint.save_model`, written atomically, so a killed run never leaves a torn
file) with the training state beside the model — optimizer, LR scheduler, gradient scaler,
iteration, best segm AP, the global RNG states and the run's options — so that a resumed run ends
in the state of an uninterrupted one.

A run may be resumed with another schedule (:data:`SCHEDULE_FIELDS`: more or fewer iterations,
other LR steps, warm-up, learning rate, weight decay, clipping norm) or another batch padding
(``input.square_pad``, which ``--compile`` sets): the changes are returned for the trainer to report.
Any other difference of configuration (model, batch, seed, ...) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fastdiffinst.checkpoint import MODEL_FORMAT, CheckpointError, read_checkpoint, save_model, stored_config
from fastdiffinst.config import ModelConfig, config_to_dict
from fastdiffinst.engine.config_diff import config_differences
from fastdiffinst.engine.rng_state import capture_rng_state, restore_rng_state

# The configuration fields a resumed run may change: they shape the optimisation from here on, not
# the model, the data stream or the random draws.
SCHEDULE_FIELDS = tuple(f"solver.{name}" for name in
                        ("max_iter", "lr_schedule", "steps", "base_lr", "warmup_iters", "warmup_factor", "weight_decay",
                         "clip_grad_norm"))
# ... and what a resumed run may change besides: the padding of its batches (a compiled resume pads
# them to one square).
RESUMABLE_FIELDS = (*SCHEDULE_FIELDS, "input.square_pad")
# What a training checkpoint holds besides the model file's entries, with the expected types.
_TRAINING_ENTRIES = {"optimizer": Mapping, "scheduler": Mapping, "scaler": Mapping, "iteration": int,
                     "best_segm_ap": float, "rng": Mapping, "options": Mapping}


class ResumePoint(NamedTuple):
    """Where a resumed run continues, and the schedule changes it was resumed with
    (``"solver.max_iter: checkpoint 6, this run 10"``)."""

    iteration: int
    best_segm_ap: float
    schedule_changes: list[str]


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
        """Restores everything ``folder/name`` holds, global RNG states included, with the schedule
        of ``cfg``; ``CheckpointError`` when the file is missing, is not a training checkpoint, was
        written by a run of another configuration, or is already past ``cfg.solver.max_iter``."""
        path = self.folder / name
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path}")
        state = read_checkpoint(path)
        _check_training_state(state, path)
        try:  # compared with the defaults of the fields added since the checkpoint was written
            saved = config_to_dict(stored_config(state, path))
        except CheckpointError as error:
            raise CheckpointError(f"--resume: {error}") from None
        differences = config_differences(saved, config_to_dict(cfg))
        refused = [line for line in differences if not line.startswith(tuple(f + ":" for f in RESUMABLE_FIELDS))]
        if refused:
            raise CheckpointError(f"--resume: {path} is a run of another configuration (only "
                                  f"{', '.join(RESUMABLE_FIELDS)} may change):\n  " + "\n  ".join(refused))
        saved_options = state.get("options") or {}
        # Runs saved before --precision recorded their autocast dtype as "amp" (None: fp32).
        saved_precision = saved_options.get("precision", saved_options.get("amp") or "fp32")
        if saved_precision != self.options["precision"]:
            raise CheckpointError(f"--resume: {path} is a run with --precision {saved_precision}, this run asks for "
                                  f"--precision {self.options['precision']} (the precision cannot change)")
        differences += [f"{key}: checkpoint {saved_options.get(key)!r}, this run {value!r}"
                        for key, value in self.options.items()
                        if key != "precision" and saved_options.get(key) != value]
        if state["iteration"] > cfg.solver.max_iter:
            raise CheckpointError(f"--resume: {path} is at iteration {state['iteration']}, beyond "
                                  f"solver.max_iter {cfg.solver.max_iter}")
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            restore_rng_state(state["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise CheckpointError(f"--resume: {path} holds a damaged training state: {error}") from None
        self._apply_schedule(cfg)
        return ResumePoint(state["iteration"], state["best_segm_ap"], differences)

    def _apply_schedule(self, cfg: ModelConfig) -> None:
        """The learning rate and weight decay of ``cfg`` in place of the restored ones (the LR factor
        itself is computed from ``cfg`` by the scheduler's function)."""
        solver, epoch = cfg.solver, self.scheduler.last_epoch
        self.scheduler.base_lrs = [solver.base_lr] * len(self.optimizer.param_groups)
        for group, lr_lambda in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group.update(initial_lr=solver.base_lr, lr=solver.base_lr * lr_lambda(epoch),
                         weight_decay=solver.weight_decay)

def _check_training_state(state: object, path: Path) -> None:
    """``CheckpointError`` unless ``state`` is a fastdiffinst model file with the training entries."""
    if not (isinstance(state, Mapping) and state.get("format") == MODEL_FORMAT):
        raise CheckpointError(f"--resume: {path} is not a fastdiffinst training checkpoint")
    wrong = [key for key, kind in _TRAINING_ENTRIES.items() if not isinstance(state.get(key), kind)]
    if "iteration" not in wrong and (isinstance(state["iteration"], bool) or state["iteration"] < 0):
        wrong.append("iteration")
    if wrong or not isinstance(state.get("config"), Mapping):
        raise CheckpointError(f"--resume: {path} holds no training state ({', '.join(wrong or ['config'])} missing "
                              f"or malformed): a model file rather than a run's last.pth?")
