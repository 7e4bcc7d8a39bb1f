"""Bad input to the command line: every flag with a number out of range or of the wrong type, bad
choices, missing or unknown arguments, bad configuration overrides, damaged or foreign checkpoint
files, bad data specs and output folders. Each case must end with exit status 2 and one line on
stderr that names the culprit — never a traceback (a checkpoint that does not fit the model adds the
list of its mismatched keys, indented, below that line). The cases run through :func:`main` in this
process (an uncaught exception fails the test as a traceback would); a sample of every kind of
failure also runs as a ``python -m fastdiffinst`` process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiffinst.checkpoint import save_model
from fastdiffinst.cli import main
from fastdiffinst.config import get_config, override
from test_train import SMALL

ROOT = Path(__file__).resolve().parents[1]

# (arguments, what the message must name); "{ckpt}" is a valid model file, "{tmp}" a fresh folder.
TRAIN = ["train", "--data", "synthetic:2", "--out", "{tmp}/run"]
EVAL = ["eval", "--checkpoint", "{ckpt}", "--data", "synthetic:2"]
DEMO = ["demo", "--checkpoint", "{ckpt}", "--synthetic", "1", "--out", "{tmp}/pictures"]
FLAG_CASES = [
    *[(TRAIN + ["--iterations", v], "--iterations") for v in ("-5", "0", "x", "1.5", "")],
    *[(TRAIN + ["--batch-size", v], "--batch-size") for v in ("0", "-1", "two")],
    *[(TRAIN + ["--lr", v], "--lr") for v in ("-1", "0", "nan", "inf", "fast")],
    *[(TRAIN + ["--seed", v], "--seed") for v in ("x", str(2**64), str(-(2**63) - 1))],
    *[(TRAIN + ["--log-period", v], "--log-period") for v in ("0", "-1", "x")],
    *[(TRAIN + ["--eval-period", v], "--eval-period") for v in ("-1", "x")],
    *[(TRAIN + ["--eval-limit", v], "--eval-limit") for v in ("0", "-3")],
    *[(TRAIN + ["--checkpoint-period", v], "--checkpoint-period") for v in ("-2", "1e3")],
    *[(TRAIN + ["--threads", v], "--threads") for v in ("0", "-1", "100000")],
    *[(TRAIN + ["--workers", v], "--workers") for v in ("-1", "x", "5000")],
    *[(TRAIN + ["--device", v], "--device") for v in ("tpu", "cuda:7", "gpu0")],
    (TRAIN + ["--config", "r9000"], "--config"),
    (TRAIN + ["--amp", "fp8"], "--amp"),
    (TRAIN + ["--ops-impl", "fast"], "--ops-impl"),
    (["train", "--data", "synthetic:2"], "--out"),
    (TRAIN + ["--bogus"], "--bogus"),
    (["fly"], "fly"),
    ([], "{train,eval,demo,config}"),
    *[(EVAL + ["--limit", v], "--limit") for v in ("0", "-1")],
    *[(EVAL + ["--batch-size", v], "--batch-size") for v in ("0", "-4")],
    *[(EVAL + ["--steps", v], "--steps") for v in ("0", "1001", "x")],
    (EVAL + ["--seed", "x"], "--seed"),
    (EVAL + ["--threads", "0"], "--threads"),
    (EVAL + ["--split", "test"], "--split"),
    (EVAL + ["--device", "cuda:3"], "--device"),
    (["eval", "--data", "coco:{tmp}/nowhere"], "--checkpoint"),  # only the synthetic set has a default model
    (["demo", "--input", "{tmp}", "--out", "{tmp}/p"], "--checkpoint"),
    *[(DEMO + ["--score-threshold", v], "--score-threshold") for v in ("1.5", "-0.1", "nan")],
    (["demo", "--checkpoint", "{ckpt}", "--synthetic", "0", "--out", "{tmp}/p"], "--synthetic"),
    (["demo", "--checkpoint", "{ckpt}", "--synthetic", "-2", "--out", "{tmp}/p"], "--synthetic"),
    (["demo", "--checkpoint", "{ckpt}", "--synthetic", str(10**9), "--out", "{tmp}/p"], "--synthetic"),
    (DEMO + ["--input", "{tmp}"], "--input"),
    (["demo", "--checkpoint", "{ckpt}", "--out", "{tmp}/p"], "--input"),
    (DEMO + ["--steps", "0"], "--steps"),
]
CONFIG_CASES = [
    (TRAIN + ["head.nope=1"], "head.nope"),
    (TRAIN + ["solver.max_iter=abc"], "solver.max_iter"),
    (TRAIN + ["noequals"], "noequals"),
    (TRAIN + ["input.crop_size=(1,a)"], "input.crop_size"),
    (TRAIN + ["solver.base_lr=-1"], "solver.base_lr"),
    (TRAIN + ["head.dropout=1.5"], "head.dropout"),
    (TRAIN + ["num_classes=0"], "num_classes"),
    (TRAIN + ["num_classes=7"], "num_classes"),
    (TRAIN + ["solver.ims_per_batch=0"], "solver.ims_per_batch"),
    (TRAIN + ["sampler.sample_steps=5000"], "sampler.sample_steps"),
]
DATA_CASES = [
    (["train", "--data", "imagenet", "--out", "{tmp}/run"], "--data"),
    (["train", "--data", "coco:", "--out", "{tmp}/run"], "coco:ROOT"),
    (["train", "--data", "synthetic:0", "--out", "{tmp}/run"], "synthetic:0"),
    (["train", "--data", "synthetic:x", "--out", "{tmp}/run"], "synthetic:x"),
    (["train", "--data", f"synthetic:{10**9}", "--out", "{tmp}/run"], f"synthetic:{10**9}"),
    (["train", "--data", "coco:{tmp}/nowhere", "--out", "{tmp}/run"], "nowhere"),
    (["train", "--data", "lvis:{tmp}", "--out", "{tmp}/run"], "lvis_v1_train.json"),
    (["eval", "--checkpoint", "{ckpt}", "--data", "coco:{tmp}/nowhere"], "nowhere"),
    (["eval", "--checkpoint", "{ckpt}", "--data", "coco:{tmp}/empty_coco"], "no images"),
    (["demo", "--checkpoint", "{ckpt}", "--input", "{tmp}/none.png", "--out", "{tmp}/p"], "none.png"),
    (["demo", "--checkpoint", "{ckpt}", "--input", "{tmp}/no_images", "--out", "{tmp}/p"], "no_images"),
    (["demo", "--checkpoint", "{ckpt}", "--input", "{tmp}/broken.png", "--out", "{tmp}/p"], "broken.png"),
    (["train", "--data", "synthetic:2", "--out", "{tmp}/blocker/run"], "blocker"),
    (["eval", "--checkpoint", "{ckpt}", "--data", "synthetic:2", "--out", "{tmp}/blocker/x"], "blocker"),
]
# Checkpoint files written by _bad_checkpoints -> (what the message says, more arguments); the
# message names the file too. "--config" reads a file that is not ours as an official checkpoint.
OFFICIAL = ["--config", "tiny"]
CHECKPOINT_FILES = {
    "missing.pth": ("not found", []), "empty.pth": ("an empty file", []), "empty.pkl": ("an empty file", []),
    "random.pth": ("unrecognised binary data", []), "random.pkl": ("unrecognised binary data", []),
    "text.pth": ("text starting with", []), "truncated.pth": ("damaged or truncated", []),
    "objects.pth": ("Python objects", []), "list.pth": ("found a list", OFFICIAL),
    "number.pkl": ("found a int", []), "no_tensors.pth": ("holds no tensors", OFFICIAL),
    "no_model.pth": ("without its 'model'", []), "bad_config.pth": ("configuration is not valid", []),
    "wrong_shapes.pth": ("does not match", []), "bad_names.pth": ("class_names", []),
    "folder.pth": ("not found", []), "not_tensors.pth": ("not tensors", []),
    "official_no_preset.pth": ("--config", []),
    "official_other_preset.pth": ("does not match", ["--config", "r50_coco"]),
}
RESUME_FILES = {"random.pth": "unrecognised binary data", "no_training.pth": "holds no training state",
                "truncated.pth": "damaged or truncated", "list.pth": "not a fastdiffinst training checkpoint"}


class _Unpicklable:
    """Stored by a torch.save of a whole object: refused by weights_only loading."""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A valid model file, bad checkpoints, a data folder without images, an unreadable image."""
    from fastdiffinst.modeling import DiffusionInst

    root = tmp_path_factory.mktemp("bad_input")
    model = DiffusionInst(override(get_config("tiny"), SMALL[:2] + ["num_classes=8"]))
    checkpoint = root / "model.pth"
    save_model(model, checkpoint, [f"class {i}" for i in range(8)])
    bad = root / "checkpoints"
    bad.mkdir()
    _bad_checkpoints(bad, checkpoint)
    (root / "no_images").mkdir()
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "blocker").write_text("")
    coco = root / "empty_coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    (coco / "annotations" / "instances_val2017.json").write_text('{"images": [], "annotations": [], '
                                                                  '"categories": [{"id": 1, "name": "x"}]}')
    return {"root": root, "checkpoint": checkpoint, "bad": bad}


def _bad_checkpoints(folder: Path, good: Path) -> None:
    state = torch.load(good, weights_only=True)
    (folder / "empty.pth").write_bytes(b"")
    (folder / "empty.pkl").write_bytes(b"")
    random_bytes = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.uint8).tolist())
    (folder / "random.pth").write_bytes(b"\x01" + random_bytes)
    (folder / "random.pkl").write_bytes(b"\x01" + random_bytes)
    (folder / "text.pth").write_text('{"model": "weights"}')
    whole = good.read_bytes()
    (folder / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    torch.save({"model": _Unpicklable()}, folder / "objects.pth")
    torch.save([1, 2, 3], folder / "list.pth")
    with open(folder / "number.pkl", "wb") as f:
        import pickle

        pickle.dump(7, f)
    torch.save({"author": "nobody"}, folder / "no_tensors.pth")
    torch.save({k: v for k, v in state.items() if k != "model"}, folder / "no_model.pth")
    torch.save({**state, "config": {**state["config"], "head": {"num_stages": "six"}}}, folder / "bad_config.pth")
    torch.save({**state, "model": {k: v[..., :1] if v.dim() else v for k, v in state["model"].items()}},
               folder / "wrong_shapes.pth")
    torch.save({**state, "class_names": [1, 2]}, folder / "bad_names.pth")
    torch.save({**state, "model": {**state["model"], "extra": "text"}}, folder / "not_tensors.pth")
    torch.save(state["model"], folder / "official_no_preset.pth")
    torch.save(state["model"], folder / "official_other_preset.pth")
    torch.save({k: v for k, v in state.items() if k != "optimizer"}, folder / "no_training.pth")
    (folder / "folder.pth").mkdir()


def _arguments(arguments: list[str], files: dict[str, Path]) -> list[str]:
    return [a.replace("{ckpt}", str(files["checkpoint"])).replace("{tmp}", str(files["root"])) for a in arguments]


def _assert_one_line_error(code: int, stderr: str, culprit: str) -> None:
    assert code == 2, stderr
    lines = stderr.rstrip().splitlines()
    assert lines and lines[0].startswith("error: "), stderr
    assert all(line.startswith("  ") for line in lines[1:]), f"more than one message line: {stderr}"
    assert "Traceback" not in stderr
    assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTDIFFINST_DATA", str(tmp_path_factory.getbasetemp() / "synthetic_data"))


@pytest.mark.parametrize(("arguments", "culprit"), FLAG_CASES + CONFIG_CASES + DATA_CASES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments(arguments, culprit, files, capsys):
    code = main(_arguments(arguments, files))
    _assert_one_line_error(code, capsys.readouterr().err, culprit)


@pytest.mark.parametrize("name", sorted(CHECKPOINT_FILES))
def test_bad_checkpoint_files(name, files, capsys):
    path = files["bad"] / name
    message, arguments = CHECKPOINT_FILES[name]
    code = main(["eval", "--checkpoint", str(path), "--data", "synthetic:2", *arguments])
    stderr = capsys.readouterr().err
    _assert_one_line_error(code, stderr, str(path))
    assert message in stderr


@pytest.mark.parametrize("name", sorted(RESUME_FILES))
def test_bad_last_checkpoint_on_resume(name, files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes((files["bad"] / name).read_bytes())
    code = main(["train", "--data", "synthetic:2", "--out", str(out), "--resume", *SMALL[:2]])
    stderr = capsys.readouterr().err
    _assert_one_line_error(code, stderr, str(out / "last.pth"))
    assert RESUME_FILES[name] in stderr


def test_a_new_run_does_not_overwrite_an_old_one(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(files["checkpoint"].read_bytes())
    code = main(["train", "--data", "synthetic:2", "--out", str(out), *SMALL[:2]])
    _assert_one_line_error(code, capsys.readouterr().err, "--resume")
    assert (out / "last.pth").read_bytes() == files["checkpoint"].read_bytes()


# One case of each kind of failure, as a process of its own.
PROCESS_CASES = [FLAG_CASES[0], FLAG_CASES[7], FLAG_CASES[-3], CONFIG_CASES[0], DATA_CASES[0], DATA_CASES[7],
                 (["eval", "--checkpoint", "{tmp}/checkpoints/random.pkl"], "random.pkl"),
                 (["eval", "--checkpoint", "{tmp}/checkpoints/truncated.pth"], "truncated.pth")]


@pytest.mark.slow
@pytest.mark.parametrize(("arguments", "culprit"), PROCESS_CASES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_in_a_process(arguments, culprit, files, tmp_path_factory):
    env = dict(os.environ, FASTDIFFINST_DATA=str(tmp_path_factory.getbasetemp() / "synthetic_data"))
    run = subprocess.run([sys.executable, "-m", "fastdiffinst", *_arguments(arguments, files)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=env)
    assert run.stdout == "" or "Traceback" not in run.stdout
    _assert_one_line_error(run.returncode, run.stderr, culprit)

