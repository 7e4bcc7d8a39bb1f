"""A training run killed with SIGKILL — inside a checkpoint write and at a random moment — then
resumed, ends bitwise equal to an uninterrupted run (dropout on), with ``last.pth`` loadable after
every kill and no temporary files left. Every run is a ``python -m fastdiffinst train`` process
with the same flags (one thread: the same kernels and summation orders in every process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import SMALL

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 5
FLAGS = ["train", "--data", "synthetic:4", "--iterations", str(ITERATIONS), "--checkpoint-period", "1",
         "--log-period", "1", "--eval-limit", "1", "--no-progress", "--threads", "1", "head.dropout=0.1", *SMALL]

# Runs the command line with torch.save cut short: the SAVE_TO_KILL-th save writes half of its bytes
# to the temporary file, flushes them and SIGKILLs its own process (a kill in the middle of a write).
KILLED_IN_SAVE = """
import io, os, signal, sys
import torch
from fastdiffinst.cli import main

save, calls = torch.save, []

def save_then_die(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) < int(os.environ["SAVE_TO_KILL"]):
        return save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def _environment(data: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, FASTDIFFINST_DATA=str(data), OMP_NUM_THREADS="1", **extra)


def _train(out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "fastdiffinst", *FLAGS, "--out", str(out), *extra],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=_environment(data))
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _iterations_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    complete = [json.loads(line) for line in lines[:-1]]  # the last line may be half written
    return max((r["iter"] for r in complete if "loss" in r), default=0)


def _saved_iteration(out: Path) -> int:
    """The iteration of ``out/last.pth``, which must load whatever moment the kill came."""
    return torch.load(out / "last.pth", weights_only=True)["iteration"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_sigkill_inside_a_checkpoint_write_and_at_random_then_resume_equals_an_uninterrupted_run(tmp_path, seed):
    data = tmp_path / "data"
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train(whole, data)

    # 1. Killed inside the write of the second checkpoint (iteration 2): last.pth stays iteration 1's.
    run = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, *FLAGS, "--out", str(split)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env=_environment(data, SAVE_TO_KILL="2"))
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert _saved_iteration(split) == 1
    assert list(split.glob(".tmp-*.pth")), "the killed write should have left its temporary file"

    # 2. Resumed, and killed at a random moment after the fourth iteration (whose checkpoint may be
    # under way), before the run can end.
    process = subprocess.Popen([sys.executable, "-m", "fastdiffinst", *FLAGS, "--out", str(split), "--resume"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=_environment(data))
    deadline = time.monotonic() + 240
    while _iterations_logged(split) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(float(np.random.default_rng(seed).uniform(0.0, 0.2)))
    process.kill()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr[-3000:]
    assert 3 <= _saved_iteration(split) <= ITERATIONS

    # 3. Resumed to the end.
    _train(split, data, "--resume")
    a = torch.load(whole / "last.pth", weights_only=True)
    b = torch.load(split / "last.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == ITERATIONS
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        for entry in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[entry], b["optimizer"]["state"][key][entry]), (key, entry)
    losses = [[r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for out in (whole, split)]
    assert losses[0] == losses[1] and len(losses[0]) == ITERATIONS
    assert not list(split.glob(".tmp-*")), "temporary files were left behind"
