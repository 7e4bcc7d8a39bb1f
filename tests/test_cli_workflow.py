"""The command line as a daily tool: the ``fastdiffinst`` console command and ``--version``,
configurations as files and ``fastdiffinst config``, ``--resume`` from the run's own configuration,
``--overwrite``, the run's ``log.txt`` and final model, ``--help`` with defaults, Ctrl-C, and the
refusal of fp16 on the CPU. Commands whose behaviour depends on the process (signals, exit status,
the installed command) run as processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdiffinst import __version__, config_files
from fastdiffinst.checkpoint import load_model
from fastdiffinst.cli import main
from fastdiffinst.config import get_config, override
from fastdiffinst.config_files import config_text, load_config
from test_train import SMALL

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--data", "synthetic:4", "--log-period", "1", "--eval-limit", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTDIFFINST_DATA", str(tmp_path_factory.getbasetemp() / "synthetic_data"))


def _process(*arguments: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "fastdiffinst", *arguments], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_console_command_and_version():
    command = Path(sys.executable).parent / "fastdiffinst"
    assert command.is_file(), "the console command is installed by `pip install -e .` (make setup)"
    run = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith(f"fastdiffinst {__version__} (torch {torch.__version__}")
    run = subprocess.run([str(command), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--overwrite" in run.stdout and "(default: 20)" in run.stdout


def test_config_files_round_trip_and_the_config_command(tmp_path, capsys, monkeypatch):
    assert main(["config", "tiny", "head.num_stages=4", "solver.steps=(5,9)"]) == 0
    (tmp_path / "run.yaml").write_text(capsys.readouterr().out)
    expected = override(get_config("tiny"), ["head.num_stages=4", "solver.steps=(5,9)"])
    assert load_config(tmp_path / "run.yaml") == expected
    reads = []
    original_resolve = config_files._resolve
    monkeypatch.setattr(config_files, "_resolve", lambda *a: reads.append(a[0]) or original_resolve(*a))
    assert main(["config", str(tmp_path / "run.yaml"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["head"]["num_stages"] == 4
    assert reads == [tmp_path / "run.yaml"]  # read once, when the command line is parsed
    (tmp_path / "small.yaml").write_text("_base_: run.yaml\nhead:\n  dim_dynamic: 8\n")
    assert load_config(tmp_path / "small.yaml") == override(expected, ["head.dim_dynamic=8"])
    (tmp_path / "c.json").write_text(config_text(expected, "json"))
    assert load_config(tmp_path / "c.json") == expected
    bad = {"loop.yaml": ("_base_: loop.yaml\n", "leads back to itself"),
           "unknown.yaml": ("head: {nope: 1}\n", "unknown fields ['nope']"),
           "broken.yaml": ("head: [\n", "not valid YAML"), "list.json": ("[1]", "holds a mapping"),
           "range.yaml": ("_base_: tiny\nhead: {num_stages: 0}\n", "head.num_stages must be a positive int"),
           "config.txt": ("", "a preset")}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        assert main(["config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "--config" not in err and name in err and message in err, err
        assert main(["train", "--config", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        assert "argument --config" in capsys.readouterr().err


def test_runs_resume_from_their_own_config_refuse_to_overwrite_and_log(tmp_path, capsys):
    out = tmp_path / "run"
    custom = tmp_path / "custom.yaml"
    custom.write_text("_base_: tiny\nhead: {dim_dynamic: 8}\n")
    arguments = ["train", "--config", str(custom), "--out", str(out), *RUN, *SMALL]
    assert main([*arguments, "--iterations", "2", "--eval-period", "1"]) == 0
    printed = capsys.readouterr().out
    # Each evaluation's table is printed and logged; the final model is saved on its own.
    assert printed.count("| segm |") == 2
    log = (out / "log.txt").read_text()
    stamp = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] "
    assert re.search(stamp + r"iter 2/2  loss \d+\.\d+ \(loss_ce .*\)  lr .*img/s  eta 0:00", log)
    assert re.search(stamp + r"\| segm \|", log) and "finished at iteration 2" in log
    model, names = load_model(out / "model_final.pth")
    assert model.cfg.head.dim_dynamic == 8 and len(names) == 8
    assert set(torch.load(out / "model_final.pth", weights_only=True)) == {"format", "version", "config", "model",
                                                                            "class_names"}
    # A new run into the same folder is refused; --resume alone continues with the run's configuration.
    assert main(["train", "--out", str(out), *RUN, "--iterations", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", *RUN, "--iterations", "3"]) == 0
    assert torch.load(out / "last.pth", weights_only=True)["iteration"] == 3
    assert "solver.max_iter: checkpoint 2, this run 3" in (out / "log.txt").read_text()
    # --overwrite starts over with what it is given, the old run's files gone.
    assert main(["train", "--out", str(out), "--overwrite", *RUN, "--iterations", "1", *SMALL]) == 0
    assert torch.load(out / "last.pth", weights_only=True)["config"]["head"]["dim_dynamic"] == 16
    assert "resumed" not in (out / "log.txt").read_text()
    assert main(["train", "--out", str(out), "--overwrite", "--resume", *RUN]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_emulated_half_precision_on_the_cpu_is_refused(tmp_path, capsys, precision):
    from fastdiffinst.modeling.precision import emulation_reason

    reason = emulation_reason(precision, "cpu")
    if reason is None:
        pytest.skip(f"this CPU computes {precision} natively: nothing to refuse")
    commands = [["train", "--out", str(tmp_path / "o"), *RUN, "--precision", precision],
                ["train", "--out", str(tmp_path / "o"), *RUN, "--amp", precision],  # the former name
                ["eval", "--data", "synthetic:2", "--precision", precision],
                ["demo", "--synthetic", "1", "--out", str(tmp_path / "d"), "--precision", precision]]
    for command in commands:
        assert main([*command, "--device", "cpu"]) == 2
        assert f"argument --precision: {reason}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_amp_is_the_former_name_of_precision(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "o"), *RUN, "--amp", "bf16", "--precision", "fp16"]) == 2
    assert "argument --amp: --amp is the former name of --precision" in capsys.readouterr().err


def _wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}; the process ended with {process.poll()}")


@pytest.mark.slow
def test_ctrl_c_stops_after_the_iteration_abandons_an_evaluation_and_twice_quits_at_once(tmp_path):
    # 20 sampling steps: an evaluation lasts long enough to be interrupted.
    long_run = ["train", *RUN[:-3], "--eval-limit", "4", "--no-progress", "--iterations", "1000", "--threads", "1",
                *SMALL, "sampler.sample_steps=20"]
    # During an evaluation: abandoned at once, last.pth saved, exit status 130.
    out = tmp_path / "eval"
    process = _process(*long_run, "--out", str(out), "--eval-period", "2")
    _wait_for(out / "log.txt", "evaluating iteration 2", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "--resume" in stderr
    log = (out / "log.txt").read_text()
    assert "evaluation at iteration 2 abandoned" in log and "| segm |" not in log
    assert torch.load(out / "last.pth", weights_only=True)["iteration"] == 2
    # Twice: the second one ends the process at once; the last checkpoint stays loadable.
    out = tmp_path / "twice"
    process = _process(*long_run, "--out", str(out), "--checkpoint-period", "1")
    _wait_for(out / "log.txt", "iter 2/1000", process)
    process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:  # again, until the process is gone
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    # Killed by the second signal (its default action), not ended by the first one's orderly stop.
    assert process.returncode == -signal.SIGINT
    # Iteration 1's checkpoint was written before iteration 2 was logged; iteration 2's may have been cut.
    assert torch.load(out / "last.pth", weights_only=True)["iteration"] >= 1
