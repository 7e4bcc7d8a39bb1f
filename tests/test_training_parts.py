"""The parts of the training engine, each on its own: throughput bookkeeping, the metrics log, the
configuration differences of --resume, the RNG states of a checkpoint, the stop signals, and the
progress bar shared with evaluation and the benchmarks (with and without tqdm)."""

from __future__ import annotations

import os
import random
import signal
import sys

import numpy as np
import pytest
import torch

from fastdiffinst.engine import throughput as throughput_module
from fastdiffinst.engine.config_diff import config_differences
from fastdiffinst.engine.metrics_log import MetricsLog
from fastdiffinst.engine.rng_state import capture_rng_state, restore_rng_state
from fastdiffinst.engine.stop_signals import handle_stop_signals
from fastdiffinst.engine.throughput import Throughput
from fastdiffinst.progress import ProgressBar


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throughput_leaves_paused_time_out_of_its_windows(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(throughput_module.time, "perf_counter", clock)
    meter = Throughput(images_per_iteration=4)
    for _ in range(3):  # three 2-second iterations, each followed by a 10-second checkpoint
        clock.now += 2.0
        meter.add_iteration()
        with meter.paused():
            clock.now += 10.0
    clock.now += 2.0
    meter.add_iteration()
    with meter.paused():
        clock.now += 1.0  # logging time: in neither window
        assert meter.report() == pytest.approx(16 / 8.0)
        clock.now += 1.0
    assert meter.train_seconds == pytest.approx(8.0)
    clock.now += 3.0
    meter.add_iteration()
    assert meter.report() == pytest.approx(4 / 3.0)
    assert meter.train_seconds == pytest.approx(11.0)
    assert meter.report() == 0.0  # an empty window


def test_metrics_log_appends_reads_and_trims(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.trim_after(3)  # no file yet: nothing to do
    assert not log.path.exists()
    for iteration in (1, 2, 3, 4, 5):
        log.append({"iter": iteration, "loss": 1.0 / iteration})
    log.append({"iter": 5, "eval": {"segm": {"AP": 0.1}}})
    assert [r["iter"] for r in log.records()] == [1, 2, 3, 4, 5, 5]
    log.trim_after(3)  # a resumed run drops what the killed run logged after its checkpoint
    assert log.records() == [{"iter": 1, "loss": 1.0}, {"iter": 2, "loss": 0.5}, {"iter": 3, "loss": 1 / 3}]


def test_config_differences_name_key_paths():
    saved = {"num_classes": 8, "head": {"dim_dynamic": 16, "num_stages": 3}, "solver": {"steps": (10,)}}
    current = {"num_classes": 8, "head": {"dim_dynamic": 8, "num_stages": 3}, "solver": {"steps": (10, 20)},
               "extra": 1}
    assert config_differences(saved, current) == [
        "extra: checkpoint None, this run 1",
        "head.dim_dynamic: checkpoint 16, this run 8",
        "solver.steps: checkpoint (10,), this run (10, 20)",
    ]
    assert config_differences(saved, saved) == []


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = capture_rng_state()
    torch.save({"rng": state}, tmp_path / "state.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(torch.load(tmp_path / "state.pth", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_stop_signals_reach_the_handler_and_the_old_handlers_come_back():
    received = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with handle_stop_signals(lambda signum, frame: received.append(signum)):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    assert received == [signal.SIGTERM, signal.SIGINT]
    assert {s: signal.getsignal(s) for s in before} == before


def test_progress_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    with ProgressBar(3, "benchmarks", "run", count_without_tqdm=True) as bar:
        bar.update(2)
        bar.write("a note")
        bar.update()
    assert capsys.readouterr().err == "[2/3]\na note\n[3/3]\n"
    with ProgressBar(10, "train", "it", initial=4) as bar:  # silent without tqdm
        bar.set(6, "loss 1.0")
    with ProgressBar(3, "eval", "batch", enabled=False, count_without_tqdm=True) as bar:
        bar.update()
        bar.write("not shown")
    assert capsys.readouterr().err == ""


def test_progress_bar_with_tqdm(capsys):
    pytest.importorskip("tqdm")
    with ProgressBar(10, "train", "it", initial=4) as bar:
        bar.set(7, "loss 0.500")
        assert bar._bar.n == 7
    err = capsys.readouterr().err
    assert "train" in err and "7/10" in err and "loss 0.500" in err
    with ProgressBar(3, "eval", "batch", enabled=False) as bar:
        bar.update()
        bar.write("not shown")
    assert capsys.readouterr().err == ""
