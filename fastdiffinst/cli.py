"""``python -m fastdiffinst {eval,demo}``.

    python -m fastdiffinst eval --checkpoint model.pth --data synthetic [--out DIR]
    python -m fastdiffinst eval --checkpoint model_final.pth --config r50_coco --data coco:/datasets/coco
    python -m fastdiffinst demo --checkpoint model.pth --input photo.jpg --out pictures/
    python -m fastdiffinst demo --checkpoint model.pth --synthetic 8 --out pictures/

``--checkpoint`` is a fastdiffinst model file, or an official DiffusionInst checkpoint together
with ``--config PRESET``. Errors in the arguments, the files or the data end the command with a
one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastdiffinst.config import PRESETS


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="fastdiffinst model file or official checkpoint")
    parser.add_argument("--config", choices=sorted(PRESETS), help="preset of an official checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops-impl", choices=["fused", "reference"], default="fused")
    parser.add_argument("--steps", type=int, help="DDIM sampling steps (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler's random boxes")
    parser.add_argument("--threads", type=int, help="CPU threads")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastdiffinst", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("eval", help="COCO-style AP of a checkpoint")
    _common(evaluate)
    evaluate.add_argument("--data", default="synthetic", help="synthetic | synthetic:N | coco:ROOT | lvis:ROOT")
    evaluate.add_argument("--split", default="val", choices=["train", "val"])
    evaluate.add_argument("--out", type=Path, help="folder for metrics.json and predictions.json")
    evaluate.add_argument("--limit", type=int, help="evaluate the first N images only")
    evaluate.add_argument("--batch-size", type=int, default=1)
    demo = commands.add_parser("demo", help="pictures of a checkpoint's results")
    _common(demo)
    source = demo.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="an image or a folder of images")
    source.add_argument("--synthetic", type=int, metavar="N", help="the first N synthetic validation images")
    demo.add_argument("--out", type=Path, required=True, help="folder for the PNG pictures")
    demo.add_argument("--score-threshold", type=float, default=0.5)
    return parser


def _load(args: argparse.Namespace):
    from fastdiffinst.checkpoint import load_model
    from fastdiffinst.config import replace_path

    model, names = load_model(args.checkpoint, args.config, args.ops_impl, args.device)
    if args.steps is not None:
        model.cfg = replace_path(model.cfg, "sampler.sample_steps", args.steps)
    return model, names


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write to the output folder {folder}: {error.strerror or error}") from None
    return folder


def run_eval(args: argparse.Namespace) -> int:
    from fastdiffinst.data import dataset_from_spec
    from fastdiffinst.engine import evaluation

    out = _writable(args.out) if args.out is not None else None
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
    from fastdiffinst.data import dataset_from_spec, read_image
    from fastdiffinst.engine.demo import draw_instances, image_files, predict_image

    out = _writable(args.out)
    model, names = _load(args)
    if args.synthetic is not None:
        if args.synthetic < 1:
            raise ValueError(f"--synthetic needs a positive count, got {args.synthetic}")
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
    args = _build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from fastdiffinst.checkpoint import CheckpointError
    from fastdiffinst.data import DatasetError

    try:
        return {"eval": run_eval, "demo": run_demo}[args.command](args)
    except (CheckpointError, DatasetError, FileNotFoundError, OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
