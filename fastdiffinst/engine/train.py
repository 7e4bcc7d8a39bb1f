"""The training loop: AdamW, warmup + multi-step LR, full-model gradient clipping, AMP, periodic
COCO evaluation, atomic checkpoints, exact resume, and DDP under ``torchrun``.

Every random draw of iteration i is a function of ``(seed, i, rank)`` — the sampler's stream of
sample positions, each sample's augmentation (seeded by its position in the stream,
:func:`fastdiffinst.data.train_loader`) and the model's box draws — so a run killed and resumed
from its last checkpoint ends in the same state as an uninterrupted one (single process; with
workers too). SIGINT/SIGTERM save a checkpoint at the end of the current iteration and stop.

Files in ``--out``: ``last.pth`` (model, optimizer, scheduler, scaler, iteration, RNG states),
``best.pth`` (best segm AP), ``metrics.jsonl`` (one line per logged iteration and per evaluation),
``config.json``, and ``loss.png`` (when matplotlib is installed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fastdiffinst.checkpoint import CheckpointError, ensure_writable, save_model
from fastdiffinst.config import ModelConfig, config_to_dict
from fastdiffinst.data.loader import RepeatFactorTrainingSampler, TrainingSampler, repeat_factors, train_loader
from fastdiffinst.data.transforms import official_train_transform
from fastdiffinst.engine import distributed


@dataclasses.dataclass
class TrainOptions:
    """What the ``train`` command sets besides the model configuration."""

    out: Path
    data: str = "synthetic"
    ops_impl: str = "fused"
    amp: str | None = None  # "bf16" | "fp16"
    compile: bool = False
    resume: bool = False
    device: str = "cpu"
    num_workers: int = 0
    log_period: int = 20
    eval_period: int = 0  # 0: evaluate at the end only
    eval_limit: int | None = None
    checkpoint_period: int = 500
    progress: bool = True


def train_transform(cfg: ModelConfig, generator: torch.Generator):
    """The official augmentation with the sizes of ``cfg.input`` (see :class:`InputConfig`)."""
    inputs = cfg.input
    return official_train_transform(inputs.min_size_train, inputs.max_size_train, inputs.crop_resize,
                                    inputs.crop_size, generator, enable_crop=inputs.crop)


def lr_factor(iteration: int, cfg) -> float:
    """detectron2 ``WarmupMultiStepLR``: linear warmup from ``warmup_factor`` over ``warmup_iters``,
    then ×0.1 at each of ``steps``."""
    warmup = 1.0
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        warmup = cfg.warmup_factor * (1 - alpha) + alpha
    return warmup * 0.1 ** sum(iteration >= s for s in cfg.steps)


def _rng_state() -> dict:
    """The global generators' states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                      has_gauss, gauss],
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _config_differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: checkpoint {x!r}, this run {y!r}")
    return out


class Trainer:
    """One training run (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, options: TrainOptions) -> None:
        from fastdiffinst.data.sources import dataset_from_spec
        from fastdiffinst.modeling import DiffusionInst

        self.cfg, self.options = cfg, options
        self.rank, self.world = distributed.rank(), distributed.world_size()
        solver = cfg.solver
        if solver.ims_per_batch % self.world:
            raise ValueError(f"solver.ims_per_batch ({solver.ims_per_batch}) must be divisible by the number of "
                             f"processes ({self.world})")
        self.batch = solver.ims_per_batch // self.world
        self.out = options.out
        if self.rank == 0:
            ensure_writable(self.out)
        self.train_set = dataset_from_spec(options.data, "train")
        self.val_set = dataset_from_spec(options.data, "val")
        if cfg.num_classes != self.train_set.num_classes:
            raise ValueError(f"the model has {cfg.num_classes} classes but {options.data} has "
                             f"{self.train_set.num_classes}: set num_classes={self.train_set.num_classes}")
        self.device = torch.device(options.device)
        torch.manual_seed(solver.seed)
        self.model = DiffusionInst(cfg, ops_impl=options.ops_impl, compile=options.compile).to(self.device)
        if cfg.loss.use_fed_loss:
            self.model.criterion.set_class_image_counts(self.train_set.class_image_counts().to(self.device))
        self.model.train()
        self.module = self.model
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=solver.base_lr, weight_decay=solver.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, solver))
        self.amp_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[options.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=options.amp == "fp16")
        self.iteration, self.best = 0, -1.0
        self._stop_signal: int | None = None

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, name: str) -> None:
        if self.rank != 0:
            return
        extra = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "iteration": self.iteration, "best_segm_ap": self.best,
                 "rng": _rng_state(), "options": {"data": self.options.data, "ops_impl": self.options.ops_impl,
                                                  "amp": self.options.amp}}
        save_model(self.module, self.out / name, self.train_set.class_names, extra)

    def resume(self) -> None:
        path = self.out / "last.pth"
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=True)
        differences = _config_differences(state["config"], config_to_dict(self.cfg))
        if differences:
            raise CheckpointError(f"--resume: {path} is a run of another configuration:\n  " + "\n  ".join(differences))
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.best = state["iteration"], state["best_segm_ap"]
        _set_rng_state(state["rng"])
        if self.rank == 0:
            _trim_metrics(self.out / "metrics.jsonl", self.iteration)

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
        generator = torch.Generator().manual_seed((self.cfg.solver.seed * 1_000_003 + self.iteration) * 64 + self.rank)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = self.model(images, targets, generator=generator)
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
        from fastdiffinst.engine.evaluation import coco_metrics, predict_dataset

        metrics = None
        if self.rank == 0:
            self.module.eval()
            results = predict_dataset(self.module, self.val_set, limit=self.options.eval_limit,
                                      generator=torch.Generator().manual_seed(0))
            count = len(self.val_set) if self.options.eval_limit is None else min(self.options.eval_limit,
                                                                                   len(self.val_set))
            metrics = coco_metrics(self.val_set.annotation_file, results,
                                   [e["id"] for e in self.val_set.images[:count]])
            self.module.train()
            self._log({"iter": self.iteration, "eval": metrics})
            if metrics["segm"]["AP"] > self.best:
                self.best = metrics["segm"]["AP"]
                self.save("best.pth")
        distributed.barrier()
        return metrics

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def train(self) -> dict | None:
        """Runs to ``solver.max_iter``; returns the last evaluation's metrics."""
        solver, options = self.cfg.solver, self.options
        if options.resume:
            self.resume()
        if self.rank == 0:
            (self.out / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        progress = _progress(solver.max_iter, self.iteration, options.progress and self.rank == 0)
        loader = self._loader()
        window_start, window_images = time.perf_counter(), 0
        train_seconds = 0.0  # wall-clock of the training iterations, evaluations and checkpoints apart
        try:
            while self.iteration < solver.max_iter:
                values = self._step(next(loader))
                self.iteration += 1
                window_images += self.batch * self.world
                if not all(math.isfinite(v) for v in values.values()):
                    raise FloatingPointError(f"non-finite losses at iteration {self.iteration}: {values}")
                if self.iteration % options.log_period == 0 or self.iteration == solver.max_iter:
                    elapsed = time.perf_counter() - window_start
                    train_seconds += elapsed
                    rate = window_images / elapsed if elapsed > 0 else 0.0
                    lr = self.optimizer.param_groups[0]["lr"]
                    self._log({"iter": self.iteration, "lr": lr, "images_per_s": rate, "train_s": train_seconds,
                               **values})
                    progress.set(self.iteration, f"loss {values['loss']:.3f} lr {lr:.2e} {rate:.1f} img/s")
                    window_start, window_images = time.perf_counter(), 0
                pause = time.perf_counter()
                if options.checkpoint_period and self.iteration % options.checkpoint_period == 0:
                    self.save("last.pth")
                if options.eval_period and self.iteration % options.eval_period == 0 \
                        and self.iteration < solver.max_iter:
                    self.evaluate()
                window_start += time.perf_counter() - pause  # checkpoints and evaluations do not count
                stop = distributed.any_flag(self._stop_signal is not None)
                if stop:
                    self.save("last.pth")
                    raise KeyboardInterrupt(f"stopped by a signal at iteration {self.iteration}; "
                                            f"{self.out / 'last.pth'} saved, continue with --resume")
        finally:
            progress.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.save("last.pth")
        metrics = self.evaluate()
        if self.rank == 0:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        return metrics


def _trim_metrics(path: Path, iteration: int) -> None:
    """Drops the records after ``iteration`` (written by a run that was killed after it)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iter"] <= iteration]
    path.write_text("".join(line + "\n" for line in kept))


class _progress:
    """A tqdm bar when available and wanted, else silent."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc="train", unit="it", file=sys.stderr)
            except ImportError:
                pass

    def set(self, iteration: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_losses(metrics_file: Path, png: Path) -> bool:
    """The total and per-term (last stage) losses against the iteration, and the segm AP of each
    evaluation; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    its = [r["iter"] for r in train]
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_masks"):
        left.plot(its, [r[key] for r in train], label=key, linewidth=1.5 if key == "loss" else 1)
    left.set_xlabel("iteration")
    left.set_ylabel("loss (weighted)")
    left.set_yscale("log")
    left.legend()
    if evals:
        for key in ("AP", "AP50"):
            right.plot([r["iter"] for r in evals], [r["eval"]["segm"][key] for r in evals], marker="o",
                       label=f"segm {key}")
            right.plot([r["iter"] for r in evals], [r["eval"]["bbox"][key] for r in evals], marker="x", linestyle="--",
                       label=f"bbox {key}")
        right.legend()
    right.set_xlabel("iteration")
    right.set_ylabel("validation")
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return True

