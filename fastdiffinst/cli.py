"""``fastdiffinst {train,eval,demo,config}`` (also ``python -m fastdiffinst``).

    fastdiffinst train --config tiny --data synthetic --out runs/tiny [--resume | --overwrite] [key=value ...]
    torchrun --nproc_per_node 8 -m fastdiffinst train --config r50_coco --data coco:/datasets/coco --out runs/r50
    fastdiffinst train --config my.yaml --data coco:train.json:train_images --val-data coco:val.json:val_images \\
        --out runs/mine
    fastdiffinst eval --data synthetic                  # the shipped model tiny-synthetic
    fastdiffinst eval --checkpoint runs/tiny/model_final.pth --data synthetic [--out DIR]
    fastdiffinst eval --checkpoint model_final.pth --config r50_coco --data coco:/datasets/coco
    fastdiffinst demo --checkpoint runs/tiny/model_final.pth --input photo.jpg --out pictures/
    fastdiffinst config tiny head.num_stages=4 > my.yaml

``--checkpoint`` is a fastdiffinst model file (a run's ``model_final.pth``, ``last.pth`` or
``best.pth``), a shipped model's name (``tiny-synthetic``, the default of ``eval`` and ``demo`` on the
synthetic set), or an official DiffusionInst checkpoint together with ``--config``. ``--config`` is
a preset or a YAML/JSON file (``fastdiffinst config`` prints one with every field). Errors in the
arguments (every number is range-checked and named), the files or the data end the command with a
one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from fastdiffinst.config import ModelConfig, get_config, integer_requirement, number_requirement, override
from fastdiffinst.data.sources import MAX_SYNTHETIC_IMAGES, is_split_independent, is_synthetic
from fastdiffinst.modeling.precision import PRECISIONS, emulation_reason


class UsageError(ValueError):
    """A command line argparse rejects (the message names the argument)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing the usage and exiting, so that
    :func:`main` reports every error the same way: one line, exit status 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _number(kind: type, low: float, high: float | None = None) -> Callable[[str], float]:
    """An argparse ``type``: an int (``kind`` int) or a finite real in ``[low, high]``, checked by the
    configuration's rules (:func:`fastdiffinst.config.integer_requirement`, ``number_requirement``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        requirement = (integer_requirement(value, low, high) if kind is int
                       else number_requirement(value, low, math.inf if high is None else high))
        if requirement is not None:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
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


def _config_source(text: str) -> ModelConfig:
    """An argparse ``type``: a preset name or a YAML/JSON configuration file, loaded
    (:func:`fastdiffinst.config_files.load_config`)."""
    from fastdiffinst.config_files import load_config

    try:
        return load_config(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with each option's default and the docstring's line breaks kept."""


def _version() -> str:
    from fastdiffinst import __version__
    from fastdiffinst._extension import built_with_cuda, has_ops

    kernels = ("CPU and CUDA" if built_with_cuda() else "CPU") if has_ops() else "none (extension not built)"
    return f"fastdiffinst {__version__} (torch {torch.__version__}; native kernels: {kernels})"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path,
                        help="a fastdiffinst model file, a shipped model's name (tiny-synthetic), or an official "
                             "checkpoint with --config (default on the synthetic set: the shipped tiny-synthetic)")
    parser.add_argument("--config", type=_config_source,
                        help="configuration of an official checkpoint: a preset or a YAML/JSON file")
    parser.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops-impl", choices=["fused", "reference"], default="fused")
    parser.add_argument("--steps", type=_config_field("sampler.sample_steps"),
                        help="DDIM sampling steps (default: the checkpoint's)")
    parser.add_argument("--seed", type=_config_field("solver.seed"), default=0,
                        help="seed of the sampler's random boxes (the range of solver.seed)")
    parser.add_argument("--threads", type=_THREADS, help="CPU threads")
    _precision_flag(parser)


def _precision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="fp32 (the official numerics) or bf16/fp16 (half-precision dense layers, fp32 boxes and "
                             "scores; docs/precision.md)")


def _check_precision(args: argparse.Namespace) -> None:
    reason = emulation_reason(args.precision, args.device)
    if reason is not None:
        raise UsageError(f"argument --precision: {reason}; use --precision fp32 here")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastdiffinst", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,demo,config}")
    train = commands.add_parser("train", help="train a model (one process, or many under torchrun)",
                                formatter_class=_HelpFormatter)
    train.add_argument("--config", type=_config_source,
                       help="a preset or a YAML/JSON file (default: tiny; with --resume, the run's config.json)")
    train.add_argument("--data", default="synthetic",
                       help="training data: synthetic | synthetic:N | coco:ROOT | coco:ANNOTATIONS.json:IMAGES_DIR | "
                            "lvis:ROOT")
    train.add_argument("--val-data", help="validation data, the same forms (default: split val of --data; "
                                          "needed with coco:ANNOTATIONS.json:IMAGES_DIR)")
    train.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics.jsonl, loss.png)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pth")
    start.add_argument("--overwrite", action="store_true", help="delete the run in --out and start a new one")
    train.add_argument("--compile", action="store_true", help="torch.compile the backbone, mask branch and head")
    train.add_argument("--recompute", action=argparse.BooleanOptionalAction,
                       help="recompute the backbone's and the decoder's activations in the backward: about half the "
                            "memory, a second forward; unset: off on the CPU, on on a GPU with the fused ops")
    _precision_flag(train)
    train.add_argument("--amp", choices=["bf16", "fp16"], help=argparse.SUPPRESS)  # the former --precision
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
    evaluate = commands.add_parser("eval", help="COCO-style AP of a checkpoint", formatter_class=_HelpFormatter)
    _common(evaluate)
    evaluate.add_argument("--data", default="synthetic",
                          help="synthetic | synthetic:N | coco:ROOT | coco:ANNOTATIONS.json:IMAGES_DIR | lvis:ROOT")
    evaluate.add_argument("--split", default="val", choices=["train", "val"],
                          help="split of --data (a coco:ANNOTATIONS.json:IMAGES_DIR is the same for both)")
    evaluate.add_argument("--out", type=Path, help="folder for metrics.json and predictions.json")
    evaluate.add_argument("--limit", type=_COUNT, help="evaluate the first N images only")
    evaluate.add_argument("--batch-size", type=_COUNT, default=1)
    demo = commands.add_parser(
        "demo", help="pictures of a checkpoint's results", formatter_class=_HelpFormatter,
        description="One PNG per image in --out: masks, boxes and 'name score' labels of the instances scoring\n"
                    "at least --score-threshold; with --show-gt the ground truth (left) beside the predictions\n"
                    "(right). Images run one at a time; in a folder or a data set, an image that cannot be read\n"
                    "is reported ('skipped PATH: REASON') and skipped. Exit status 0 when at least one picture\n"
                    "was written, 2 when none. Video is not read: extract its frames and pass the folder, e.g.\n"
                    "    ffmpeg -i video.mp4 frames/%05d.png")
    _common(demo)
    source = demo.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="an image or a folder of images (not a video)")
    source.add_argument("--synthetic", type=_number(int, 1, MAX_SYNTHETIC_IMAGES), metavar="N",
                        help="the first N synthetic validation images, rendered in memory (no data set written)")
    source.add_argument("--data", metavar="SPEC",
                        help="the images of a data set, as eval's --data: synthetic:N | coco:ROOT | lvis:ROOT | ...")
    demo.add_argument("--split", choices=["train", "val"], help="split of --data (val when not given)")
    demo.add_argument("--limit", type=_COUNT, metavar="N", help="the first N images of --data only")
    demo.add_argument("--show-gt", action="store_true",
                      help="draw the ground truth (left, labels without scores) beside the predictions (right) in "
                           "one picture twice as wide; with --data or --synthetic")
    demo.add_argument("--out", type=Path, required=True, help="folder for the PNG pictures")
    demo.add_argument("--score-threshold", type=_number(float, 0, 1),
                      help="draw the predictions scoring at least this (default: 0.5; for a shipped model, its "
                           "own, the F1-best on validation)")
    demo.add_argument("--mask-alpha", type=_number(float, 0, 1), default=0.45, metavar="ALPHA",
                      help="opacity of the masks (0: outlines and labels only, 1: solid)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    config = commands.add_parser("config", help="print a configuration with every field",
                                 formatter_class=_HelpFormatter)
    config.add_argument("source", type=_config_source, help="a preset or a YAML/JSON file")
    config.add_argument("overrides", nargs="*", metavar="key=value", help="fields to change, e.g. head.num_stages=3")
    config.add_argument("--format", choices=["yaml", "json"], default="yaml")
    return parser


def _default_checkpoint(args: argparse.Namespace, synthetic: bool) -> None:
    """Without ``--checkpoint``: the shipped synthetic-set model on the synthetic set (said on stdout),
    a usage error elsewhere."""
    from fastdiffinst import zoo

    if args.checkpoint is not None:
        return
    if not synthetic:
        raise UsageError(f"argument --checkpoint: required except on the synthetic set (where the shipped "
                         f"{zoo.SYNTHETIC_DEFAULT} is the default); a model file or a shipped model's name")
    args.checkpoint = Path(zoo.SYNTHETIC_DEFAULT)
    print(f"no --checkpoint: using {zoo.summary(zoo.SYNTHETIC_DEFAULT)}", flush=True)


def _load(args: argparse.Namespace):
    from fastdiffinst.checkpoint import load_model
    from fastdiffinst.config import replace_path

    model, names = load_model(args.checkpoint, args.config, args.ops_impl, args.device)
    model.set_precision(args.precision)
    if args.steps is not None:
        model.cfg = replace_path(model.cfg, "sampler.sample_steps", args.steps)
    return model, names


def run_train(args: argparse.Namespace) -> int:
    from fastdiffinst.config_files import load_config
    from fastdiffinst.engine import distributed
    from fastdiffinst.engine.train import Trainer, TrainOptions

    fields = list(args.overrides)
    for flag, path in _TRAIN_CONFIG_FLAGS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            fields.append(f"{path}={value}")
    if args.amp is not None:
        if args.precision != "fp32" and args.precision != args.amp:
            raise UsageError(f"argument --amp: --amp is the former name of --precision; give one of them "
                             f"(--amp {args.amp} --precision {args.precision})")
        print(f"note: --amp {args.amp} is now --precision {args.amp}", file=sys.stderr)
        args.precision = args.amp
    _check_precision(args)
    run_config = args.out / "config.json"
    source = args.config if args.config is not None else (run_config if args.resume and run_config.is_file()
                                                          else "tiny")
    cfg = override(load_config(source), fields)
    if args.val_data is None and is_split_independent(args.data):
        print(f"warning: --data {args.data} is one data set for every split: the validation metrics are measured on "
              f"the training data (give the validation set with --val-data)", file=sys.stderr)
    device = distributed.setup(args.device)
    try:
        options = TrainOptions(out=args.out, data=args.data, ops_impl=args.ops_impl, precision=args.precision,
                               compile=args.compile, recompute=args.recompute, resume=args.resume,
                               overwrite=args.overwrite, device=device,
                               num_workers=args.workers, log_period=args.log_period, eval_period=args.eval_period,
                               eval_limit=args.eval_limit, checkpoint_period=args.checkpoint_period,
                               progress=not args.no_progress, val_data=args.val_data)
        Trainer(cfg, options).train()  # its log shows each evaluation's table
    finally:
        distributed.teardown()
    return 0


def run_config(args: argparse.Namespace) -> int:
    from fastdiffinst.config_files import config_text, load_config

    print(config_text(override(load_config(args.source), args.overrides), args.format), end="")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from fastdiffinst.checkpoint import ensure_writable
    from fastdiffinst.data import dataset_from_spec
    from fastdiffinst.engine import evaluation

    _check_precision(args)
    out = ensure_writable(args.out) if args.out is not None else None
    _default_checkpoint(args, is_synthetic(args.data))
    model, _ = _load(args)
    dataset = dataset_from_spec(args.data, args.split)
    if model.cfg.num_classes != dataset.num_classes:
        raise ValueError(f"{args.checkpoint} has {model.cfg.num_classes} classes but {args.data} has "
                         f"{dataset.num_classes} ({dataset.annotation_file})")
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
    per_class = metrics.pop(evaluation.PER_CLASS, None)
    split = None if is_split_independent(args.data) else args.split
    print(f"{args.data} ({f'{split}, ' if split else ''}{count} images), {args.checkpoint}; AP in percent")
    print(evaluation.format_metrics(metrics))
    if per_class:
        print()
        print(evaluation.format_per_class({evaluation.PER_CLASS: per_class}))
    if out is not None:
        evaluation.write_json(out / "metrics.json", {"data": args.data, "split": split, "images": count,
                                                     "checkpoint": str(args.checkpoint), "unit": evaluation.UNIT,
                                                     "undefined": -1, "metrics": metrics, "per_class": per_class})
        evaluation.write_json(out / "predictions.json", results)
        print(f"metrics and predictions written to {out}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from fastdiffinst import zoo
    from fastdiffinst.checkpoint import ensure_writable
    from fastdiffinst.data import dataset_from_spec, read_image
    from fastdiffinst.data.synthetic import CLASSES, render_sample
    from fastdiffinst.engine.demo import DEFAULT_SCORE_THRESHOLD, image_files, picture_names, write_pictures
    from fastdiffinst.predictor import Predictor

    if args.show_gt and args.input is not None:
        raise UsageError("argument --show-gt: needs ground truth, from --data SPEC or --synthetic N, not --input")
    for flag, value in (("--split", args.split), ("--limit", args.limit)):
        if value is not None and args.data is None:
            raise UsageError(f"argument {flag}: applies to --data only")
    _check_precision(args)
    _default_checkpoint(args, args.synthetic is not None or (args.data is not None and is_synthetic(args.data)))
    out = ensure_writable(args.out)
    single = False
    gt_names = None
    if args.input is not None:
        files = image_files(args.input)
        single = args.input.is_file()
        if single:  # read now: an unreadable file ends the command before the model is loaded
            image = read_image(args.input)
            items = [(args.input.stem, args.input, lambda: (image, None))]
        else:
            items = [(name, path, lambda path=path: (read_image(path), None))
                     for name, path in zip(picture_names(files), files)]
        total = len(files)
    elif args.synthetic is not None:
        # The first N validation images, rendered in memory (each depends only on its index).
        def synthetic(index: int):
            sample = render_sample(index, "val")
            return sample["image"], ({key: sample[key] for key in ("boxes", "labels", "masks")} if args.show_gt
                                     else None)

        items = ((f"synthetic-{i:05d}", None, lambda i=i: synthetic(i)) for i in range(args.synthetic))
        total, gt_names = args.synthetic, list(CLASSES)
    else:
        dataset = dataset_from_spec(args.data, args.split or "val")
        total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
        gt_names = dataset.class_names

        def from_dataset(index: int):
            if not args.show_gt:
                return dataset.load_image(index), None
            sample = dataset[index]
            return sample["image"], {key: sample[key] for key in ("boxes", "labels", "masks")}

        names = picture_names([Path(str(entry.get("file_name") or entry.get("coco_url") or entry["id"]))
                               for entry in dataset.images[:total]])
        items = ((name, None, lambda i=i: from_dataset(i)) for i, name in enumerate(names))
    predictor = Predictor(args.checkpoint, config=args.config, device=args.device, ops_impl=args.ops_impl,
                          steps=args.steps, seed=args.seed, precision=args.precision)
    threshold = args.score_threshold
    if threshold is None:
        threshold = zoo.demo_score_threshold(args.checkpoint) or DEFAULT_SCORE_THRESHOLD
    written, skipped = write_pictures(predictor, items, total, out, score_threshold=threshold,
                                      alpha=args.mask_alpha, gt_class_names=gt_names, skip_unreadable=not single,
                                      progress=total > 1 and not args.no_progress)
    print(f"{written} picture{'s' if written != 1 else ''} written to {out}, {skipped} skipped")
    if written == 0:
        print(f"error: no picture written: {'the image was' if skipped == 1 else f'all {skipped} images were'} "
              f"skipped", file=sys.stderr)
        return 2
    return 0


def console_main() -> None:
    """The ``fastdiffinst`` console command."""
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    from fastdiffinst.checkpoint import CheckpointError
    from fastdiffinst.data import DatasetError

    try:
        args = _build_parser().parse_args(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    try:
        commands = {"train": run_train, "eval": run_eval, "demo": run_demo, "config": run_config}
        return commands[args.command](args)
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
