"""Test harness: the Triton interpreter switch, seeding, the ``cuda`` marker, RNG isolation.

``TRITON_INTERPRET=1`` must be set before any Triton kernel is defined, so it is decided here,
before fastdiffinst is imported: on a machine without a GPU the Triton kernels run in the
interpreter on CPU tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdiffinst.ops

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    fastdiffinst.ops.set_input_checks(True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A selection that matches no test (e.g. -k on a CPU-only machine) is not a failure.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture(autouse=True)
def _isolated_rng():
    """Every test starts from seed 0 and leaves the global RNG and determinism flags as it found them."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if HAS_CUDA else None
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
    torch.use_deterministic_algorithms(deterministic)


def devices() -> list[str]:
    """Devices to parametrize over: "cpu", plus "cuda" (marked) so CUDA tests show up as skipped."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
