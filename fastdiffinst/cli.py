"""``python -m fastdiffinst {train,eval,demo}``.

    python -m fastdiffinst train --config tiny --data synthetic --out runs/tiny [--resume] [key=value ...]
    torchrun --nproc_per_node 8 -m fastdiffinst train --config r50_coco --data coco:/datasets/coco --out runs/r50
    python -m fastdiffinst eval --checkpoint model.pth --data synthetic [--out DIR]
    python -m fastdiffinst eval --checkpoint model_final.pth --config r50_coco --data coco:/datasets/coco
    python -m fastdiffinst demo --checkpoint model.pth --input photo.jpg --out pictures/
    python -m fastdiffinst demo --checkpoint model.pth --synthetic 8 --out pictures/

``--checkpoint`` is a fastdiffinst model file, or an official DiffusionInst checkpoint together
with ``--config PRESET``. Errors in the arguments (every number is range-checked and named), the
files or the data end the command with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from fastdiffinst.config import PRESETS, get_config, override
from fastdiffinst.data.sources import MAX_SYNTHETIC_IMAGES


class UsageError(ValueError):
    """A command line argparse rejects (the message names the argument)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing the usage and exiting, so that
    :func:`main` reports every error the same way: one line, exit status 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _number(kind: type, low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: ``kind`` (int or float) in ``[low, high]`` (``(low, high]`` with
    ``low_open``), finite."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
            interval = f"> {low}" if low_open else f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} {interval}, "
                                             f"got {text}")
        return value

    return parse


def _config_field(path: str) -> Callable[[str], object]:
    """An argparse ``type`` for a flag that sets the configuration field ``path``: parsed and checked
    by the configuration's own rules (:func:`fastdiffinst.config.override`)."""
    def parse(text: str):
        try:
            cfg = override(get_config("tiny"), [f"{path}={text}"])
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix("config: ").removeprefix("config override ")) \
                from None
        section, field = path.split(".")
        return getattr(getattr(cfg, section), field)

    return parse


_COUNT = _number(int, 1)  # a positive count: images, iterations, ...
_PERIOD = _number(int, 0)  # iterations between events, 0 for none
# Threads and processes: beyond these a typo, which would hang the machine starting them.
_THREADS = _number(int, 1, 1024)
_WORKERS = _number(int, 0, 256)
# The range torch.Generator.manual_seed accepts.
_SEED = _number(int, -(2**63), 2**64 - 1)


def _device(text: str) -> str:
    """An argparse ``type``: a device this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


# Flags of `train` that set a configuration field.
_TRAIN_CONFIG_FLAGS = (("--iterations", "solver.max_iter"), ("--batch-size", "solver.ims_per_batch"),
                       ("--lr", "solver.base_lr"), ("--seed", "solver.seed"))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="fastdiffinst model file or official checkpoint")
    parser.add_argument("--config", choices=sorted(PRESETS), help="preset of an official checkpoint")
    parser.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops-impl", choices=["fused", "reference"], default="fused")
    parser.add_argument("--steps", type=_config_field("sampler.sample_steps"),
                        help="DDIM sampling steps (default: the checkpoint's)")
    parser.add_argument("--seed", type=_SEED, default=0, help="seed of the sampler's random boxes")
    parser.add_argument("--threads", type=_THREADS, help="CPU threads")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fastdiffinst", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model (one process, or many under torchrun)")
    train.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="preset (default tiny)")
    train.add_argument("--data", default="synthetic", help="synthetic | synthetic:N | coco:ROOT | lvis:ROOT")
    train.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics.jsonl, loss.png)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pth")
    train.add_argument("--compile", action="store_true", help="torch.compile the backbone, mask branch and head")
    train.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (autocast)")
    train.add_argument("--ops-impl", choices=["fused", "reference"], default="fused")
    train.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--workers", type=_WORKERS, default=0, help="data-loading worker processes (0: none)")
    for flag, path in _TRAIN_CONFIG_FLAGS:
        train.add_argument(flag, type=_config_field(path), help=path)
    train.add_argument("--log-period", type=_COUNT, default=20, help="iterations between log records")
    train.add_argument("--eval-period", type=_PERIOD, default=0, help="iterations between evaluations (0: at the end)")
    train.add_argument("--eval-limit", type=_COUNT, help="evaluate on the first N validation images")
    train.add_argument("--checkpoint-period", type=_PERIOD, default=500,
                       help="iterations between last.pth saves (0: at the end and on a stop signal only)")
    train.add_argument("--threads", type=_THREADS, help="CPU threads")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config fields, e.g. head.num_stages=3")
    evaluate = commands.add_parser("eval", help="COCO-style AP of a checkpoint")
    _common(evaluate)
    evaluate.add_argument("--data", default="synthetic", help="synthetic | synthetic:N | coco:ROOT | lvis:ROOT")
    evaluate.add_argument("--split", default="val", choices=["train", "val"])
    evaluate.add_argument("--out", type=Path, help="folder for metrics.json and predictions.json")
    evaluate.add_argument("--limit", type=_COUNT, help="evaluate the first N images only")
    evaluate.add_argument("--batch-size", type=_COUNT, default=1)
    demo = commands.add_parser("demo", help="pictures of a checkpoint's results")
    _common(demo)
    source = demo.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="an image or a folder of images")
    source.add_argument("--synthetic", type=_number(int, 1, MAX_SYNTHETIC_IMAGES), metavar="N",
                        help="the first N synthetic validation images")
    demo.add_argument("--out", type=Path, required=True, help="folder for the PNG pictures")
    demo.add_argument("--score-threshold", type=_number(float, 0, 1), default=0.5)
    return parser


def _load(args: argparse.Namespace):
    from fastdiffinst.checkpoint import load_model
    from fastdiffinst.config import replace_path

    model, names = load_model(args.checkpoint, args.config, args.ops_impl, args.device)
    if args.steps is not None:
        model.cfg = replace_path(model.cfg, "sampler.sample_steps", args.steps)
    return model, names


def run_train(args: argparse.Namespace) -> int:
    from fastdiffinst.config import get_config, override
    from fastdiffinst.engine import distributed
    from fastdiffinst.engine.evaluation import format_metrics
    from fastdiffinst.engine.train import Trainer, TrainOptions

    fields = list(args.overrides)
    for flag, path in _TRAIN_CONFIG_FLAGS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            fields.append(f"{path}={value}")
    cfg = override(get_config(args.config), fields)
    device = distributed.setup(args.device)
    try:
        options = TrainOptions(out=args.out, data=args.data, ops_impl=args.ops_impl, amp=args.amp,
                               compile=args.compile, resume=args.resume, device=device, num_workers=args.workers,
                               log_period=args.log_period, eval_period=args.eval_period, eval_limit=args.eval_limit,
                               checkpoint_period=args.checkpoint_period, progress=not args.no_progress)
        metrics = Trainer(cfg, options).train()
        if metrics is not None:
            print(format_metrics(metrics))
    finally:
        distributed.teardown()
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from fastdiffinst.checkpoint import ensure_writable
    from fastdiffinst.data import dataset_from_spec
    from fastdiffinst.engine import evaluation

    out = ensure_writable(args.out) if args.out is not None else None
    model, _ = _load(args)
    dataset = dataset_from_spec(args.data, args.split)
    lvis = args.data.startswith("lvis:")
    results = evaluation.predict_dataset(model, dataset, max_dets=300 if lvis else 100, batch_size=args.batch_size,
                                         limit=args.limit, generator=torch.Generator().manual_seed(args.seed),
                                         progress=True)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    image_ids = [entry["id"] for entry in dataset.images[:count]]
    if lvis:
        metrics = evaluation.lvis_metrics(dataset.annotation_file, results)
    else:
        metrics = evaluation.coco_metrics(dataset.annotation_file, results, image_ids)
    print(f"{args.data} ({args.split}, {count} images), {args.checkpoint}")
    print(evaluation.format_metrics(metrics))
    if out is not None:
        evaluation.write_json(out / "metrics.json", {"data": args.data, "split": args.split, "images": count,
                                                     "checkpoint": str(args.checkpoint), "metrics": metrics})
        evaluation.write_json(out / "predictions.json", results)
        print(f"metrics and predictions written to {out}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from fastdiffinst.checkpoint import ensure_writable
    from fastdiffinst.data import dataset_from_spec, read_image
    from fastdiffinst.engine.demo import draw_instances, image_files, predict_image

    out = ensure_writable(args.out)
    model, names = _load(args)
    if args.synthetic is not None:
        # The first N images of the validation split (every image depends only on its index).
        dataset = dataset_from_spec(f"synthetic:{args.synthetic}", "val")
        inputs = [(f"synthetic-{i:05d}", dataset.load_image(i)) for i in range(len(dataset))]
    else:
        inputs = [(path.stem, path) for path in image_files(args.input)]
    generator = torch.Generator().manual_seed(args.seed)
    for name, source in inputs:
        image = read_image(source) if isinstance(source, Path) else source
        instances = predict_image(model, image, generator)
        target = out / f"{name}.png"
        draw_instances(image, instances, names, args.score_threshold).save(target)
        shown = int((instances["scores"] >= args.score_threshold).sum())
        print(f"{target}: {shown} instances (of {len(instances['scores'])}) at score >= {args.score_threshold}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from fastdiffinst.checkpoint import CheckpointError
    from fastdiffinst.data import DatasetError

    try:
        args = _build_parser().parse_args(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return {"train": run_train, "eval": run_eval, "demo": run_demo}[args.command](args)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, DatasetError, FileNotFoundError, OSError, ValueError, RuntimeError,
            FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (a smaller --batch-size, images or model?)", file=sys.stderr)
        return 2
