"""The training engine: LR schedule, exact resume after an interruption, signals, a 2-process gloo
DDP run with an empty batch on one rank, torch.compile vs eager, the CLI end to end, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiffinst.checkpoint import CheckpointError
from fastdiffinst.cli import main
from fastdiffinst.config import SolverConfig, get_config, override
from fastdiffinst.engine.train import Trainer, TrainOptions, lr_factor, training_recompute

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["head.num_stages=2", "num_proposals=16", "solver.ims_per_batch=2", "solver.warmup_iters=2",
         "input.min_size_train=(96,128)", "input.max_size_train=160", "input.crop_resize=(96,)",
         "input.crop_size=(64,96)", "input.min_size_test=96", "input.max_size_test=160"]


@pytest.fixture()
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFFINST_DATA", str(tmp_path / "data"))
    return tmp_path


def small_config(**solver):
    cfg = override(get_config("tiny"), SMALL)
    for name, value in solver.items():
        setattr(cfg.solver, name, value)
    return cfg


def test_lr_schedule_warmup_and_steps():
    cfg = SolverConfig(base_lr=1.0, warmup_iters=10, warmup_factor=0.01, steps=(20, 30))
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(5, cfg) == pytest.approx(0.01 * 0.5 + 0.5)
    assert lr_factor(10, cfg) == 1.0 and lr_factor(19, cfg) == 1.0
    assert lr_factor(20, cfg) == pytest.approx(0.1) and lr_factor(35, cfg) == pytest.approx(0.01)


@pytest.mark.parametrize("schedule, halfway", [("cosine", 0.5), ("linear", 0.5)])
def test_lr_schedule_decays_to_zero_at_max_iter_and_ignores_steps(schedule, halfway):
    cfg = SolverConfig(base_lr=1.0, warmup_iters=10, warmup_factor=0.01, steps=(20,), max_iter=100,
                       lr_schedule=schedule)
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    # the warm-up multiplies the decay, as detectron2's schedulers do
    decay_at_5 = 0.5 * (1 + math.cos(math.pi * 0.05)) if schedule == "cosine" else 0.95
    assert lr_factor(5, cfg) == pytest.approx((0.01 * 0.5 + 0.5) * decay_at_5)
    assert lr_factor(50, cfg) == pytest.approx(halfway)
    assert lr_factor(25, cfg) > lr_factor(50, cfg) > lr_factor(75, cfg) > lr_factor(99, cfg) > 0
    assert lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-12) and lr_factor(150, cfg) == lr_factor(100, cfg)
    if schedule == "cosine":
        assert lr_factor(25, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    else:
        assert lr_factor(25, cfg) == pytest.approx(0.75)


def _options(out: Path, **changes) -> TrainOptions:
    return TrainOptions(out=out, data="synthetic:4", log_period=1, checkpoint_period=100, eval_limit=2,
                        progress=False, **changes)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_recomputes_where_asked_and_not_on_the_cpu_by_default(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert training_recompute(None, cpu) is False
    assert training_recompute(None, cuda) is None  # the model's own default (on for the fused ops)
    assert training_recompute(True, cpu) is True and training_recompute(False, cuda) is False
    default = Trainer(small_config(max_iter=1), _options(tmp_path / "default")).module
    assert not default.head.recompute_stages and not default.backbone.bottom_up.recompute
    asked = Trainer(small_config(max_iter=1), _options(tmp_path / "asked", recompute=True)).module
    assert asked.head.recompute_stages and asked.backbone.bottom_up.recompute


def test_train_cli_passes_recompute_on_off_or_unset(monkeypatch, tmp_path):
    seen = []

    class Recorder:
        def __init__(self, cfg, options):
            seen.append(options.recompute)

        def train(self):
            return None

    monkeypatch.setattr("fastdiffinst.engine.train.Trainer", Recorder)
    for flags in ([], ["--recompute"], ["--no-recompute"]):
        assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 0
    assert seen == [None, True, False]


# Runs whose training draws from torch's global generator besides the trainer's own generators.
RANDOM_LAYERS = {"dropout": ["head.dropout=0.1"],
                 "drop-path": ["backbone.name=swin", "backbone.swin.embed_dim=16", "backbone.swin.depths=(1,1,1,1)",
                               "backbone.swin.num_heads=(1,1,1,1)", "backbone.swin.window_size=4",
                               "backbone.swin.drop_path_rate=0.5"]}


def _assert_same_training_state(a: Trainer, b: Trainer) -> None:
    for (name, x), y in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(x, y), name
    for x, y in zip(a.optimizer.state_dict()["state"].values(), b.optimizer.state_dict()["state"].values()):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])


@pytest.mark.parametrize("layers", sorted(RANDOM_LAYERS))
def test_resume_after_an_interruption_equals_an_uninterrupted_run(data_root, layers):
    cfg = override(small_config(max_iter=5), RANDOM_LAYERS[layers])
    whole = Trainer(cfg, _options(data_root / "whole"))
    whole.train()

    first = Trainer(cfg, _options(data_root / "split"))
    step = first._step

    def interrupted_step(batch):
        values = step(batch)
        if first.iteration == 2:  # the third step: a SIGTERM arrives while it runs
            first._on_signal(signal.SIGTERM, None)
        return values

    first._step = interrupted_step
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        first.train()
    saved = torch.load(data_root / "split" / "last.pth", weights_only=True)
    assert saved["iteration"] == 3
    resumed = Trainer(cfg, _options(data_root / "split", resume=True))
    torch.rand(7)  # whatever draws from the global generator before the resumed run changes nothing
    resumed.train()
    _assert_same_training_state(whole, resumed)
    train_records = [r for r in _records(data_root / "whole" / "metrics.jsonl") if "loss" in r]
    resumed_records = [r for r in _records(data_root / "split" / "metrics.jsonl") if "loss" in r]
    assert [r["iter"] for r in resumed_records] == [1, 2, 3, 4, 5]
    for a, b in zip(train_records, resumed_records):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
    assert not list((data_root / "split").glob(".tmp-*")), "a temporary checkpoint was left behind"


def test_a_finished_run_extends_to_more_iterations_with_a_new_schedule(data_root, capsys):
    cfg = override(small_config(max_iter=5), ["solver.steps=(4,)"])
    whole = Trainer(cfg, _options(data_root / "whole"))
    whole.train()
    Trainer(small_config(max_iter=3), _options(data_root / "extended")).train()
    extended = Trainer(cfg, _options(data_root / "extended", resume=True))
    extended.train()
    _assert_same_training_state(whole, extended)
    printed, log = capsys.readouterr().out, (data_root / "extended" / "log.txt").read_text()
    for text in (printed, log):
        assert "solver.max_iter: checkpoint 3, this run 5" in text and "solver.steps" in text
    records = _records(data_root / "extended" / "metrics.jsonl")
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert any(r.get("resumed_with") for r in records)
    # A different learning rate takes effect from the resumed iteration on.
    lower = Trainer(override(cfg, ["solver.max_iter=6", "solver.base_lr=1e-6"]),
                    _options(data_root / "extended", resume=True))
    lower.train()
    assert [r["lr"] for r in _records(data_root / "extended" / "metrics.jsonl")
            if r["iter"] == 6 and "loss" in r] == [pytest.approx(1e-7)]
    with pytest.raises(CheckpointError, match="iteration 6, beyond solver.max_iter 4"):
        Trainer(override(cfg, ["solver.max_iter=4"]), _options(data_root / "extended", resume=True)).train()


def test_resume_checks_the_configuration(data_root):
    cfg = small_config(max_iter=1)
    Trainer(cfg, _options(data_root / "run")).train()
    for change, message in (("head.dim_dynamic=8", "head.dim_dynamic: checkpoint 16, this run 8"),
                            ("solver.seed=3", "solver.seed"), ("solver.ims_per_batch=4", "solver.ims_per_batch")):
        with pytest.raises(CheckpointError, match=message):
            Trainer(override(cfg, [change]), _options(data_root / "run", resume=True)).train()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(cfg, _options(data_root / "empty", resume=True)).train()
    path = data_root / "run" / "last.pth"
    state = torch.load(path, weights_only=True)
    state["config"]["head"]["num_stages"] = 0
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="the stored configuration is not valid: .*head.num_stages"):
        Trainer(cfg, _options(data_root / "run", resume=True)).train()


def test_compiled_training_pads_batches_to_one_square_and_may_resume_an_eager_run(data_root, capsys):
    cfg = small_config(max_iter=1)
    Trainer(cfg, _options(data_root / "run")).train()
    # A run saved before input.square_pad existed resumes: missing fields take their defaults.
    path = data_root / "run" / "last.pth"
    state = torch.load(path, weights_only=True)
    del state["config"]["input"]["square_pad"]
    torch.save(state, path)
    compiled = Trainer(cfg, _options(data_root / "run", resume=True, compile=True))
    assert compiled.cfg.input.square_pad == cfg.input.max_size_train == 160 and cfg.input.square_pad == 0
    compiled.resume()  # what train() does first; compiling would take minutes
    assert "input.square_pad: checkpoint 0, this run 160" in capsys.readouterr().out
    # The training forward pads to the square (an eager model of the same configuration).
    from fastdiffinst.modeling import DiffusionInst
    from test_losses import synthetic_batch

    images, targets = synthetic_batch([(96, 64), (80, 112)], [2, 1], cfg.num_classes)
    for square, padded in ((160, (160, 160)), (0, (96, 128))):
        model = DiffusionInst(override(cfg, [f"input.square_pad={square}"])).train()
        outputs = model.training_outputs(images, targets, generator=torch.Generator().manual_seed(0))
        assert outputs.batch.tensor.shape[2:] == padded and outputs.batch.image_sizes == [(96, 64), (80, 112)]
    explicit = override(cfg, ["input.square_pad=200"])
    assert Trainer(explicit, _options(data_root / "other", compile=True)).cfg.input.square_pad == 200


def _coco_with_an_empty_image(root: Path) -> Path:
    """A COCO-layout folder whose two training images are one annotated and one empty."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        images, annotations = [], []
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(root / f"{split}2017" / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "height": 64, "width": 80})
        mask = np.zeros((64, 80), np.uint8)
        mask[10:40, 20:60] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        annotations.append({"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 40, 30], "iscrowd": 0,
                            "segmentation": rle, "area": 1200})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}))
    return root


@pytest.mark.slow
def test_two_process_gloo_ddp_with_an_empty_batch_on_one_rank(tmp_path):
    data = _coco_with_an_empty_image(tmp_path / "coco")
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "fastdiffinst", "train", "--config", "tiny", "--data", f"coco:{data}", "--out", str(out),
               "--iterations", "3", "--batch-size", "2", "--log-period", "1", "--eval-limit", "1", "--no-progress",
               "--threads", "1", "num_classes=1", *SMALL[:2]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [r for r in _records(out / "metrics.jsonl") if "loss" in r]
    assert [r["iter"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["iteration"] == 3 and not any(k.startswith("module.") for k in state["model"])


@pytest.mark.slow
def test_compiled_training_compiles_once_for_varying_sizes_and_equals_eager():
    from fastdiffinst.modeling import DiffusionInst
    from test_losses import synthetic_batch
    from utils import assert_same_training_step

    torch._dynamo.reset()
    cfg = override(small_config(), ["input.square_pad=160"])  # what `train --compile` sets
    torch.manual_seed(0)
    eager = DiffusionInst(cfg).train()
    compiled = DiffusionInst(cfg, compile=True).train()
    compiled.load_state_dict(eager.state_dict())
    counters = torch._dynamo.utils.counters
    counters.clear()  # dynamo's reset leaves the counts of earlier compilations
    graphs = []
    for seed, sizes in enumerate([[(96, 128), (64, 96)], [(160, 112), (80, 80)], [(128, 160), (72, 40)]]):
        images, targets = synthetic_batch(sizes, [3, 1], 8, seed=seed)
        # The losses agree within 1e-4; the gradients below the mask branch's BatchNorms do not agree
        # as closely under inductor (up to 2e-3 relative L2 measured, against 3e-6 for eager vs
        # float64).
        assert_same_training_step(eager, compiled, images, targets, seed, (1e-4, 1e-4), 5e-3)
        eager.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)
        graphs.append(counters["stats"]["unique_graphs"])
    # Backbone, mask branch and decoder: compiled at the first batch, never again.
    assert graphs[0] >= 3 and graphs[1] == graphs[2] == graphs[0], graphs


def test_train_cli_end_to_end_then_eval(data_root, capsys):
    out = data_root / "cli"
    assert main(["train", "--data", "synthetic:4", "--out", str(out), "--iterations", "2", "--log-period", "1",
                 "--eval-limit", "2", "--no-progress", *SMALL]) == 0
    assert {p.name for p in out.iterdir()} >= {"last.pth", "best.pth", "metrics.jsonl", "config.json"}
    records = _records(out / "metrics.jsonl")
    assert [r["iter"] for r in records if "loss" in r] == [1, 2] and "images_per_s" in records[0]
    assert any("eval" in r for r in records)
    assert "| segm |" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / "last.pth"), "--data", "synthetic:4", "--limit", "2"]) == 0


def test_train_cli_bad_input(data_root, capsys):
    assert main(["train", "--data", f"coco:{data_root / 'nowhere'}", "--out", str(data_root / "o"), *SMALL]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    blocker = data_root / "file"
    blocker.write_text("")
    assert main(["train", "--data", "synthetic:4", "--out", str(blocker / "run"), *SMALL]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic:4", "--out", str(data_root / "o"), "--resume", *SMALL]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic:4", "--out", str(data_root / "o"), "head.nope=1"]) == 2
    assert "no field" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes(data_root):
    out = data_root / "signal"
    command = [sys.executable, "-m", "fastdiffinst", "train", "--data", "synthetic:4", "--out", str(out),
               "--iterations", "400", "--log-period", "1", "--eval-limit", "1", "--no-progress", "--threads", "1",
               *SMALL]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr
    state = torch.load(out / "last.pth", weights_only=True)
    assert 2 <= state["iteration"] < 400
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train(data_root, precision):
    trainer = Trainer(small_config(max_iter=2), _options(data_root / precision, precision=precision))
    assert trainer.module.precision == precision
    before = [p.detach().clone() for p in trainer.module.parameters()]
    trainer.train()
    records = [r for r in _records(data_root / precision / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    assert all(p.dtype == torch.float32 for p in trainer.module.parameters())  # fp32 master weights
    changed = any(not torch.equal(a, p) for a, p in zip(before, trainer.module.parameters()))
    # fp16: the gradient scaler skips the steps whose scaled gradients overflow and lowers its scale.
    assert changed or (precision == "fp16" and trainer.scaler.get_scale() < 65536.0)
    # A run's precision cannot change on --resume.
    with pytest.raises(CheckpointError, match=f"is a run with --precision {precision}, this run asks for --precision "
                                              f"fp32"):
        Trainer(small_config(max_iter=3), _options(data_root / precision, resume=True)).train()
