"""The training loop: AdamW, warmup + multi-step LR, full-model gradient clipping, AMP, periodic
COCO evaluation, atomic checkpoints, exact resume, and DDP under ``torchrun``.

Every random draw of iteration i is a function of ``(seed, i, rank)`` — the sampler's stream of
sample positions, each sample's augmentation (seeded by its position in the stream,
:func:`fastdiffinst.data.train_loader`), the model's box draws, and dropout and stochastic depth,
which draw from torch's global generator, seeded for each iteration — so a run killed and resumed
from its last checkpoint ends in the same state as an uninterrupted one (single process; with
workers too). SIGINT/SIGTERM save a checkpoint at the end of the current iteration and stop. A run
can be resumed with a longer or otherwise changed schedule (``solver.max_iter``, ``steps``, ...:
:mod:`fastdiffinst.engine.training_checkpoint`); the changes are printed and logged.

Files in ``--out``: ``last.pth`` (model, optimizer, scheduler, scaler, iteration, RNG states:
:mod:`fastdiffinst.engine.training_checkpoint`), ``best.pth`` (best segm AP), ``metrics.jsonl`` (one
line per logged iteration and per evaluation: :mod:`fastdiffinst.engine.metrics_log`),
``config.json``, and ``loss.png`` (when matplotlib is installed: :mod:`fastdiffinst.engine.loss_plot`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from fastdiffinst.checkpoint import CheckpointError, ensure_writable, remove_stale_temporaries, save_model
from fastdiffinst.config import ModelConfig, config_to_dict, replace_path
from fastdiffinst.data.loader import (
    RepeatFactorTrainingSampler,
    TrainingSampler,
    derived_generator,
    repeat_factors,
    train_loader,
)
from fastdiffinst.data.transforms import official_train_transform
from fastdiffinst.engine import distributed
from fastdiffinst.engine.loss_plot import plot_losses
from fastdiffinst.engine.metrics_log import MetricsLog
from fastdiffinst.engine.run_log import RunLog, format_duration
from fastdiffinst.engine.stop_signals import handle_stop_signals
from fastdiffinst.engine.throughput import Throughput
from fastdiffinst.engine.training_checkpoint import TrainingCheckpoints
from fastdiffinst.progress import ProgressBar

# The trained model alone (weights, configuration, class names), written when a run completes.
FINAL_MODEL = "model_final.pth"
# What a run writes in its folder (besides the temporary files of atomic writes).
RUN_FILES = ("last.pth", "best.pth", FINAL_MODEL, "metrics.jsonl", "log.txt", "config.json", "loss.png")


class EvaluationAbandoned(Exception):
    """Raised by the stop-signal handler inside an evaluation, to leave it at once."""


@dataclasses.dataclass
class TrainOptions:
    """What the ``train`` command sets besides the model configuration."""

    out: Path
    data: str = "synthetic"
    val_data: str | None = None  # the validation set's spec; None: split "val" of ``data``
    ops_impl: str = "fused"
    precision: str = "fp32"  # "bf16" | "fp16": mixed precision (fastdiffinst.modeling.precision)
    compile: bool = False
    recompute: bool | None = None  # None: off on the CPU, the model's default elsewhere (training_recompute)
    resume: bool = False
    device: str = "cpu"
    num_workers: int = 0
    log_period: int = 20
    eval_period: int = 0  # 0: evaluate at the end only
    eval_limit: int | None = None
    checkpoint_period: int = 500
    progress: bool = True
    overwrite: bool = False  # delete a run found in ``out`` and start a new one


def train_transform(cfg: ModelConfig, generator: torch.Generator):
    """The official augmentation with the sizes of ``cfg.input`` (see :class:`InputConfig`)."""
    inputs = cfg.input
    return official_train_transform(inputs.min_size_train, inputs.max_size_train, inputs.crop_resize,
                                    inputs.crop_size, generator, enable_crop=inputs.crop)


def lr_factor(iteration: int, cfg) -> float:
    """The learning rate of ``iteration`` as a fraction of ``base_lr``: a linear warmup from
    ``warmup_factor`` over ``warmup_iters`` times the decay of ``lr_schedule`` (detectron2's
    ``WarmupMultiStepLR`` / ``WarmupCosineLR``, or a linear decay to 0 at ``max_iter``)."""
    warmup = 1.0
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        warmup = cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.lr_schedule == "step":
        return warmup * 0.1 ** sum(iteration >= s for s in cfg.steps)
    progress = min(iteration / cfg.max_iter, 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return warmup * decay


def training_recompute(requested: bool | None, device: torch.device) -> bool | None:
    """Whether training recomputes activations (``DiffusionInst.set_recompute``); None leaves the
    model's default. The default is off on the CPU: recomputation saves memory, which a CPU rarely
    lacks, at the cost of a second forward of the backbone and the decoder (the ``tiny`` recipe on
    2 cores: 396 ms per iteration instead of 478, docs/training.md), and on for the fused ops on a
    GPU, whose memory bounds the batch."""
    if requested is None and device.type == "cpu":
        return False
    return requested


class Trainer:
    """One training run (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, options: TrainOptions) -> None:
        from fastdiffinst.data.sources import dataset_from_spec
        from fastdiffinst.modeling import DiffusionInst

        if options.compile and cfg.input.square_pad == 0:
            # One input shape for every batch: each compiled module is then one graph, compiled
            # once, instead of a recompilation per new image size (InputConfig.square_pad).
            cfg = replace_path(cfg, "input.square_pad", cfg.input.max_size_train)
        self.cfg, self.options = cfg, options
        self.rank, self.world = distributed.rank(), distributed.world_size()
        solver = cfg.solver
        if solver.ims_per_batch % self.world:
            raise ValueError(f"solver.ims_per_batch ({solver.ims_per_batch}) must be divisible by the number of "
                             f"processes ({self.world})")
        self.batch = solver.ims_per_batch // self.world
        self.out = options.out
        self._start_folder(options)
        self.train_set = dataset_from_spec(options.data, "train")
        self.val_set = dataset_from_spec(options.val_data or options.data, "val", like=self.train_set)
        if cfg.num_classes != self.train_set.num_classes:
            raise ValueError(f"the model has {cfg.num_classes} classes but {options.data} has "
                             f"{self.train_set.num_classes}: set num_classes={self.train_set.num_classes}")
        self.device = torch.device(options.device)
        torch.manual_seed(solver.seed)
        self.model = DiffusionInst(cfg, ops_impl=options.ops_impl, compile=options.compile,
                                   recompute=training_recompute(options.recompute, self.device),
                                   precision=options.precision).to(self.device)
        if cfg.loss.use_fed_loss:
            self.model.criterion.set_class_image_counts(self.train_set.class_image_counts().to(self.device))
        self.model.train()
        self.module = self.model
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = [p for p in self.module.parameters() if p.requires_grad]
        # The fused kernel updates every parameter in one pass: 4.6 ms per step for the tiny model's
        # 229 tensors on 2 CPU threads, against 18-42 ms for the per-tensor loop (docs/training.md).
        self.optimizer = torch.optim.AdamW(params, lr=solver.base_lr, weight_decay=solver.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, solver))
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=options.precision == "fp16")
        self.iteration, self.best = 0, -1.0
        self._stop_signal: int | None = None
        self._evaluating = False
        self._progress: ProgressBar | None = None
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.run_log = RunLog(self.out / "log.txt", self._echo)
        self.checkpoints = TrainingCheckpoints(self.out, self.module, self.optimizer, self.scheduler, self.scaler,
                                               self.train_set.class_names,
                                               {"data": options.data, "ops_impl": options.ops_impl,
                                                "precision": options.precision})

    def _start_folder(self, options: TrainOptions) -> None:
        """``--out`` for this run: a new run refuses a folder that holds one (starting over would
        overwrite its checkpoints and mix its metrics with the new ones) unless ``overwrite``, which
        deletes the old run's files first."""
        existing = [name for name in RUN_FILES if (self.out / name).exists()]
        if existing and not options.resume:
            if not options.overwrite:
                raise CheckpointError(f"{self.out} holds a run ({', '.join(existing)}): continue it with --resume, "
                                      f"start over with --overwrite, or choose another --out")
            if self.rank == 0:
                for name in existing:
                    (self.out / name).unlink()
                remove_stale_temporaries(self.out)
        if self.rank == 0:
            ensure_writable(self.out)

    # -- checkpoints (rank 0 writes them) -------------------------------------------------------

    def save(self, name: str) -> None:
        """Writes ``name`` (rank 0), after deleting what an earlier write killed midway left behind."""
        if self.rank == 0:
            remove_stale_temporaries(self.out)
            self.checkpoints.save(name, self.iteration, self.best)

    def resume(self) -> None:
        """Continues from ``last.pth``; changes of schedule or options are printed and logged."""
        self.iteration, self.best, changes = self.checkpoints.resume("last.pth", self.cfg, self.device)
        if self.rank == 0:
            remove_stale_temporaries(self.out)
            self.metrics.trim_after(self.iteration)
            self._line(f"resumed {self.out / 'last.pth'} at iteration {self.iteration}"
                       + (" with changes:\n  " + "\n  ".join(changes) if changes else ""))
            if changes:
                self._log({"iter": self.iteration, "resumed_with": changes})

    # -- the loop --------------------------------------------------------------------------------

    def _loader(self) -> Iterator[list[dict]]:
        seed = self.cfg.solver.seed
        if self.options.data.startswith("lvis:"):  # LVIS trains with repeat-factor sampling (t = 0.001)
            factors = repeat_factors([self.train_set.image_labels(i) for i in range(len(self.train_set))])
            sampler = RepeatFactorTrainingSampler(factors, seed=seed, rank=self.rank, world_size=self.world)
        else:
            sampler = TrainingSampler(len(self.train_set), seed=seed, rank=self.rank, world_size=self.world)
        loader = train_loader(self.train_set, self.batch, lambda g: train_transform(self.cfg, g), sampler,
                              seed=seed + self.rank, start=self.iteration * self.batch,
                              num_workers=self.options.num_workers)
        return iter(loader)

    def _step(self, batch: list[dict]) -> dict[str, float]:
        images = [s["image"].to(self.device) for s in batch]
        targets = [{k: s[k].to(self.device) for k in ("boxes", "labels", "masks")} for s in batch]
        stream = (self.cfg.solver.seed * 1_000_003 + self.iteration) * 64 + self.rank
        generator = derived_generator(stream)  # the box draws
        torch.manual_seed((stream + 2**63) % 2**64)  # dropout, drop-path: another stream than the boxes'
        losses = self.model(images, targets, generator=generator)  # under autocast in bf16/fp16
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.solver.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        values = torch.stack([v.detach().float() for v in losses.values()] + [total.detach().float()])
        values = distributed.mean(values)
        return dict(zip(list(losses) + ["loss"], values.tolist()))

    def evaluate(self) -> dict | None:
        """COCO metrics of the model on the validation set (rank 0; None on the others), logged with
        their table; a new best segm AP is saved as ``best.pth``. A stop signal abandons it (None)."""
        from fastdiffinst.engine.evaluation import coco_metrics, format_metrics, predict_dataset

        metrics = None
        if self.rank == 0:
            count = len(self.val_set) if self.options.eval_limit is None else min(self.options.eval_limit,
                                                                                   len(self.val_set))
            # Evaluating from before the line that announces it: a stop signal right after the line
            # must abandon this evaluation, not wait for its end.
            self._evaluating = True
            try:
                self._line(f"evaluating iteration {self.iteration} on {count} validation images")
                self.module.eval()
                results = predict_dataset(self.module, self.val_set, limit=count,
                                          generator=torch.Generator().manual_seed(0), progress=self.options.progress)
                metrics = coco_metrics(self.val_set.annotation_file, results,
                                       [e["id"] for e in self.val_set.images[:count]])
            except EvaluationAbandoned:
                self._line(f"evaluation at iteration {self.iteration} abandoned: stop signal")
            finally:
                self._evaluating = False
                self.module.train()
            if metrics is not None:
                self._log({"iter": self.iteration, "eval": metrics})
                self._line(f"evaluation at iteration {self.iteration} (AP in percent):\n{format_metrics(metrics)}")
                if metrics["segm"]["AP"] > self.best:
                    self.best = metrics["segm"]["AP"]
                    self.save("best.pth")
        distributed.barrier()
        return metrics

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            self.metrics.append(record)

    def _line(self, text: str) -> None:
        """A line of ``log.txt``, shown on the console too (rank 0)."""
        if self.rank == 0:
            self.run_log.line(text)

    def _echo(self, text: str) -> None:
        if self._progress is not None:
            self._progress.write(text)  # above the bar, which stays intact
        else:
            print(text, flush=True)

    def _on_signal(self, signum, frame) -> None:
        """The first SIGINT/SIGTERM: stop after the current iteration (saving ``last.pth``), or now
        if an evaluation runs; the signal's default action comes back, so a second one ends the
        process at once (``last.pth``, written atomically, stays whole)."""
        self._stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration (again to quit at once)",
              file=sys.stderr, flush=True)
        if self._evaluating:
            raise EvaluationAbandoned

    def train(self) -> dict | None:
        """Runs to ``solver.max_iter``; returns the last evaluation's metrics."""
        max_iter = self.cfg.solver.max_iter
        if self.options.resume:
            self.resume()
        with handle_stop_signals(self._on_signal), \
                ProgressBar(max_iter, "train", "it", initial=self.iteration,
                            enabled=self.options.progress and self.rank == 0) as progress:
            self._progress = progress if self.options.progress else None
            self._line(f"training {self.options.data} ({len(self.train_set)} images) from iteration {self.iteration} "
                       f"to {max_iter}, batch {self.cfg.solver.ims_per_batch}, on {self.device}; run folder {self.out}")
            side = self.cfg.input.square_pad
            if side:
                self._line(f"every batch is padded to {side}×{side} (input.square_pad; 0 pads each to its largest "
                           f"image)" + ("; compiled for that one shape at the first iteration (minutes on a CPU)"
                                        if self.options.compile else ""))
            if self.rank == 0:
                (self.out / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
            progress.set(self.iteration, "")
            loader = self._loader()
            throughput = Throughput(self.batch * self.world)
            status = ""
            while self.iteration < max_iter:
                values = self._train_iteration(next(loader))
                throughput.add_iteration()
                with throughput.paused():  # logging, checkpoints and evaluations are not training time
                    if self.iteration % self.options.log_period == 0 or self.iteration == max_iter:
                        status = self._log_iteration(values, throughput)
                    progress.set(self.iteration, status)
                    self._periodic_checkpoint_and_evaluation()
                if distributed.any_flag(self._stop_signal is not None):
                    self._stop_on_signal()
            self.save("last.pth")  # a kill in the final evaluation keeps the trained state
            metrics = self.evaluate()
            self.save("last.pth")  # with the final evaluation's best AP
            if self._stop_signal is not None:
                raise KeyboardInterrupt(f"stopped by a signal during the final evaluation; {self.out / 'last.pth'} "
                                        f"is saved at iteration {self.iteration}")
            if self.rank == 0:
                save_model(self.module, self.out / FINAL_MODEL, self.train_set.class_names)
                plot_losses(self.metrics.path, self.out / "loss.png")
                self._line(f"finished at iteration {self.iteration}: the model is {self.out / FINAL_MODEL}")
        self._progress = None
        return metrics

    def _train_iteration(self, batch: list[dict]) -> dict[str, float]:
        """One optimisation step; the iteration count moves on; non-finite losses raise."""
        values = self._step(batch)
        self.iteration += 1
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"non-finite losses at iteration {self.iteration}: {values}")
        return values

    def _log_iteration(self, values: dict[str, float], throughput: Throughput) -> str:
        """A ``metrics.jsonl`` record and a ``log.txt`` line for this iteration; returns the progress
        bar's text."""
        lr = self.optimizer.param_groups[0]["lr"]
        images_per_s = throughput.report()
        self._log({"iter": self.iteration, "lr": lr, "images_per_s": images_per_s,
                   "train_s": throughput.train_seconds, **values})
        remaining = (self.cfg.solver.max_iter - self.iteration) * self.batch * self.world
        eta = format_duration(remaining / images_per_s) if images_per_s > 0 else "?"
        losses = " ".join(f"{name} {value:.4f}" for name, value in values.items() if name != "loss")
        self._line(f"iter {self.iteration}/{self.cfg.solver.max_iter}  loss {values['loss']:.4f} ({losses})  "
                   f"lr {lr:.3e}  {images_per_s:.2f} img/s  eta {eta}")
        return f"loss {values['loss']:.3f} lr {lr:.2e} {images_per_s:.1f} img/s"

    def _periodic_checkpoint_and_evaluation(self) -> None:
        """``last.pth`` every ``checkpoint_period`` iterations, an evaluation every ``eval_period``
        (the final ones are made by :meth:`train`)."""
        options = self.options
        # The evaluation first: the checkpoint then holds its best AP, and a kill during it loses
        # nothing a resume does not redo.
        if options.eval_period and self.iteration % options.eval_period == 0 \
                and self.iteration < self.cfg.solver.max_iter:
            self.evaluate()
        if options.checkpoint_period and self.iteration % options.checkpoint_period == 0:
            self.save("last.pth")

    def _stop_on_signal(self) -> None:
        """Saves ``last.pth`` and stops (a signal reached one of the processes)."""
        self.save("last.pth")
        message = (f"stopped by a signal at iteration {self.iteration}; {self.out / 'last.pth'} saved, "
                   f"continue with --resume")
        self._line(message)
        raise KeyboardInterrupt(message)
