"""``python -m benchmarks.run`` end to end on the smoke profile (tiny sizes, one repeat; the JSON, the
markdown, the plots; every requested study and baseline produced a number), its argument errors,
gpu_check.sh's syntax, and the pytest-benchmark microbenchmarks run once. Timings are not checked."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import run as bench_run

ROOT = Path(__file__).resolve().parents[1]

BASELINES = {
    "mask_head": {"official grouped conv", "bmm", "torch.compile(bmm)"},
    "roi_align": {"torchvision"},
    "box_diffusion": {"official per-image", "batched reference", "torch.compile(reference)"},
    "paste_masks": {"official chain (chunks of "},
    "model": {"reference ops (official)"},
    "model_training": {"reference ops (official)", "reference ops + recomputation"},
    "model_precision": {"official fp32", "official bf16 autocast"},
}
DIRECTIONS = {"model": {"inference", "inference: images + backbone + FPN + mask branch",
                        "inference: DDIM sampling (decoder + box ops)",
                        "inference: post-processing (top-k, NMS, masks, paste)"},
              "model_training": {"training step (forward + backward)", "peak memory",
                                 "training step (forward + backward), bf16"},
              "model_precision": {"official bf16 autocast", "ours fp32", "ours bf16"}}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--profile", "smoke", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_smoke_run_writes_stamped_json_with_every_study_and_baseline(smoke_run):
    out, _ = smoke_run
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    for key in ("date", "device", "torch", "triton", "torchvision", "python", "commit", "threads", "profile"):
        assert meta[key] not in (None, ""), key
    assert meta["profile"] == "smoke" and meta["studies"] == list(bench_run.STUDIES)
    assert set(meta["ceilings"]) >= {"copy_GBps", "fp32_matmul_TFLOPs", "bf16_matmul_TFLOPs"}
    assert all(_positive(v) for v in meta["ceilings"].values())
    rows = data["results"]
    for study, baselines in BASELINES.items():
        mine = [r for r in rows if r["study"] == study]
        # A baseline named with a prefix ("official chain (chunks of ") varies with the sizes.
        prefixes = {next((b for b in baselines if r["baseline"].startswith(b)), r["baseline"]) for r in mine}
        assert prefixes == baselines, study
        for row in mine:
            if row["direction"] == "peak memory":
                assert isinstance(row["ours_peak_bytes"], int) and isinstance(row["baseline_peak_bytes"], int)
                assert row["baseline_peak_bytes"] > 0 and row["ours_peak_bytes"] >= 0
            else:
                assert _positive(row["ours_median_s"]) and _positive(row["baseline_median_s"]), row
    for study, directions in DIRECTIONS.items():
        assert {r["direction"] for r in rows if r["study"] == study} == directions
    assert meta["complete"] is True
    inference = [r for r in rows if r["study"] == "model" and r["direction"] == "inference"]
    # (proposals, DDIM steps the model ran): the steps come from the models' configs.
    assert sorted((r["n"], r["steps"]) for r in inference) == [(10, 1), (10, 2), (20, 1)]
    # Batch 1 and 2; ours in bf16 against both official variants; images/s on both sides.
    precision = [r for r in rows if r["study"] == "model_precision"]
    assert sorted({r["batch"] for r in precision}) == [1, 2]
    assert {r["baseline"] for r in precision if r["direction"] == "ours bf16"} == {"official fp32",
                                                                                 "official bf16 autocast"}
    assert all(_positive(r["images_per_s"]) and _positive(r["baseline_images_per_s"]) for r in precision)
    # Their products' FLOPs, the rate over them and the bound: two images are exactly twice one
    # image's products (the backbone and the decoder's layers run per image and per proposal).
    flops = {batch: {r["dense_gflop"] for r in precision if r["batch"] == batch} for batch in (1, 2)}
    assert all(len(f) == 1 for f in flops.values()) and _positive(min(flops[1]))
    assert min(flops[2]) == pytest.approx(2 * min(flops[1]), rel=1e-12)
    assert all("% of " in r["ours_rate"] and _positive(r["ceiling_bound_x"]) for r in precision)
    # Every op row states its achieved rate against a ceiling measured in the same run.
    assert all("% of " in r["ours_rate"] for r in rows
               if not r["study"].startswith("model") and r["direction"] != "peak memory")
    # The smoke profile is no measurement: no target verdicts.
    assert not any("target" in r for r in rows)


def test_smoke_run_prints_and_writes_the_table_and_plots(smoke_run):
    out, stdout = smoke_run
    header = "| op | case | direction | baseline | ours ms (median) |"
    assert header in stdout
    markdown = (out / "results.md").read_text()
    assert header in markdown and "Measured ceilings:" in markdown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in stdout
    else:
        for name in ("speedup_vs_n.png", "memory.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in markdown


def test_selected_studies_only(tmp_path):
    assert bench_run.main(["--profile", "smoke", "--studies", "box_diffusion", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["study"] for r in data["results"]} == {"box_diffusion"}
    # Every fused call's time is split into the Python layer and the native op on CPU.
    for row in data["results"]:
        assert row["host_us"] >= 0 and row["kernel_us"] > 0 and row["launches"] is None
        assert row["baseline"] != "official per-image" or "per call: host" in row["max_abs_diff"]


@pytest.mark.parametrize("args, message", [
    (["--studies", "roi_align,nope"], "unknown studies ['nope']"),
    (["--studies", ","], "--studies is empty"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as error:
        bench_run.main(args + ["--out", str(tmp_path)])
    assert error.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_requested_without_a_gpu(capsys, tmp_path):
    with pytest.raises(SystemExit) as error:
        bench_run.main(["--device", "cuda", "--out", str(tmp_path)])
    assert error.value.code == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_unwritable_output_folder_fails_before_measuring(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as error:
        bench_run.main(["--studies", "model", "--out", str(blocker / "results")])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot write to the output folder" in err


@pytest.mark.parametrize("script", ["run.py", "training_memory.py"])
@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_scripts_run_as_files_from_anywhere(script, where, tmp_path):
    """``python benchmarks/<script> --help``: run as a file, a script runs itself again as the
    package's module, from the repository root or any other folder."""
    cwd = ROOT if where == "repository root" else tmp_path
    result = subprocess.run([sys.executable, str((ROOT / "benchmarks" / script).relative_to(ROOT) if cwd == ROOT
                                                 else ROOT / "benchmarks" / script), "--help"],
                            cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"usage: python -m benchmarks.{script.removesuffix('.py')}" in result.stdout


def test_gpu_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    result = subprocess.run([bash, "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_microbenchmarks_run_once():
    """The pytest-benchmark suite (not in make test's selection) still runs: each benchmark once."""
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_microbenchmarks.py", "-q",
                             "--benchmark-disable", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "12 passed" in result.stdout, result.stdout[-1000:]


def test_compiled_training_study_times_the_same_batches_on_the_square_padding(tmp_path, monkeypatch):
    """The compiled-training benchmark's eager variants (the compiled one costs minutes: run by hand):
    every iteration timed, the square padding and the recomputation applied, the steady state
    summarised per variant."""
    from benchmarks import compiled_training
    from test_train import SMALL

    monkeypatch.setenv("FASTDIFFINST_DATA", str(tmp_path / "data"))
    runs = [compiled_training.measure(variant, "tiny", "synthetic:4", compiled_training.SETTLE + 2, SMALL)
            for variant in ("eager", "eager square", "eager recompute")]
    assert [r["square_pad"] for r in runs] == [0, 160, 0]
    assert [r["recompute"] for r in runs] == [False, False, True]
    assert all(len(r["seconds"]) == compiled_training.SETTLE + 2 and min(r["seconds"]) > 0 for r in runs)
    runs.append({**runs[1], "variant": "compiled square"})
    timings = compiled_training.summarise(runs, list(compiled_training.VARIANTS))
    eager = sorted(runs[0]["seconds"][compiled_training.SETTLE:])
    assert timings["eager"].median_s == (eager[0] + eager[1]) / 2 and timings["eager"].repeats == 1
