"""The golden fixture of the official code (shared/reference/fixtures/official_small.pt) and helpers
to build the matching model and replay its random draws."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor

from fastdiffinst.checkpoint import load_official
from fastdiffinst.config import get_config, replace_path
from fastdiffinst.modeling import DiffusionInst

FIXTURE = Path(os.environ.get("FASTDIFFINST_FIXTURE",
                              Path(__file__).resolve().parents[2] / "shared/reference/fixtures/official_small.pt"))


@functools.lru_cache(maxsize=1)
def _load() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def fixture() -> dict:
    if not FIXTURE.is_file():
        pytest.skip(f"the golden fixture is not at {FIXTURE} (set FASTDIFFINST_FIXTURE)")
    return _load()


def official_model(sample_steps: int, ops_impl: str) -> DiffusionInst:
    """The fixture's configuration with its official weights, reproducing the official ensemble."""
    cfg = replace_path(get_config("official_small"), "sampler.sample_steps", sample_steps)
    cfg = replace_path(cfg, "sampler.official_ensemble", True)
    model = DiffusionInst(cfg, ops_impl=ops_impl).eval()
    load_official(model, fixture()["state_dict"])
    return model


def replay(draws: list[dict]):
    """A ``draws(shape, dtype, device)`` hook returning the recorded draws in order; it checks that
    each request has the recorded shape and dtype."""
    pending = iter(draws)

    def draw(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        record = next(pending, None)
        assert record is not None, f"an extra draw {shape} {dtype} that the official code did not make"
        value = record["value"]
        assert tuple(value.shape) == tuple(shape) and value.dtype == dtype, \
            f"draw {record['role']}: asked for {dtype} {tuple(shape)}, the official code drew {value.dtype} {tuple(value.shape)}"
        return value.clone()

    draw.remaining = lambda: sum(1 for _ in pending)
    return draw


def assert_close_rel(actual: Tensor, expected: Tensor, rel: float = 1e-4, what: str = "") -> None:
    """max |actual - expected| <= rel · max |expected| (the fixture README's tolerance)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    actual, expected = actual.detach(), expected.detach()
    scale = float(expected.double().abs().max()) if expected.numel() else 0.0
    error = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    assert error <= rel * max(scale, 1e-12), f"{what}: max error {error:.3g} > {rel} × {scale:.3g}"
