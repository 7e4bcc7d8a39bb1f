"""Registration of the native ops: kernels per device, backend selection and reporting, and the
import footprint of ``fastdiffinst.ops`` (docs/design.md §2, §3)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
import torch

import fastdiffinst.ops as fops
from conftest import devices
from fastdiffinst import _extension
from fastdiffinst.ops import _dispatch

# Every op of the fastdiffinst namespace, discovered, so that a new op is covered without editing this file:
# the C++ ops of fastdiffinst._C, and the Triton custom ops (registered for every device).
ALL_OPS = tuple(sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                       if name.startswith("fastdiffinst::")))
TRITON_OPS = tuple(op for op in ALL_OPS if "_triton" in op)
NATIVE_OPS = tuple(op for op in ALL_OPS if op not in TRITON_OPS)
PUBLIC_OPS = ("roi_align", "multilevel_roi_align", "q_sample_boxes", "ddim_step_boxes", "paste_masks")


def test_native_ops_discovered():
    assert set(PUBLIC_OPS) | {"_roi_align_backward", "_multilevel_roi_align_backward", "dynamic_mask_head",
                              "dynamic_mask_dice_sums"} <= set(NATIVE_OPS)
    assert {"dynamic_mask_head_triton", "_dynamic_mask_head_triton_backward", "dynamic_mask_dice_sums_triton",
            "_dynamic_mask_dice_sums_triton_backward"} == set(TRITON_OPS)


@pytest.mark.parametrize("op", TRITON_OPS)
def test_triton_ops_run_on_every_device(op):
    # custom ops without device_types: one kernel for every device (CUDA; CPU through the interpreter)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiffinst::{op}", "CompositeExplicitAutograd")


@pytest.mark.parametrize("op", NATIVE_OPS)
def test_cpu_kernel_registered(op):
    assert _extension.has_ops(), "fastdiffinst._C is not loaded"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiffinst::{op}", "CPU")
    assert _extension.has_kernel(op, "cpu")


# C++ ops whose CUDA implementation is Triton (the *_triton ops), so fastdiffinst._C has CPU kernels only.
CPU_ONLY_OPS = ("dynamic_mask_head", "_dynamic_mask_head_backward", "dynamic_mask_dice_sums",
                "_dynamic_mask_dice_sums_backward")


@pytest.mark.parametrize("op", NATIVE_OPS)
def test_cuda_kernel_registered_iff_built_with_cuda(op):
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiffinst::{op}", "CUDA")
    assert has_cuda_kernel == (_extension.built_with_cuda() and op not in CPU_ONLY_OPS)
    assert _extension.has_kernel(op, "cuda") == has_cuda_kernel


@pytest.mark.parametrize("op", ALL_OPS)
def test_fake_kernel_registered(op):
    # A fake (meta) kernel is what torch.compile and opcheck trace through.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiffinst::{op}", "Meta")


@pytest.mark.parametrize("op", ("roi_align", "_roi_align_backward", "multilevel_roi_align",
                                "_multilevel_roi_align_backward", "dynamic_mask_head", "dynamic_mask_dice_sums",
                                "dynamic_mask_head_triton", "dynamic_mask_dice_sums_triton"))
def test_autograd_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiffinst::{op}", "Autograd")


def test_python_limits_are_the_kernels():
    """The argument checks use the kernels' limits, exported by fastdiffinst._C; the fallbacks used
    without the extension hold the same values."""
    # The modules, by name: fastdiffinst.ops re-exports functions called like two of them.
    checks = importlib.import_module("fastdiffinst.ops._checks")
    mask_head = importlib.import_module("fastdiffinst.ops.dynamic_mask_head")
    multilevel = importlib.import_module("fastdiffinst.ops.multilevel_roi_align")
    assert _extension.has_ops(), "fastdiffinst._C is not loaded"
    native = _extension._C
    assert {name: getattr(native, name) for name in _extension._FALLBACK_LIMITS} == _extension._FALLBACK_LIMITS
    assert checks.MAX_SAMPLING_RATIO == native.MAX_SAMPLING_RATIO
    assert multilevel._MAX_LEVELS == native.MAX_LEVELS
    assert mask_head.MAX_CHANNELS == native.MASK_HEAD_MAX_CHANNELS
    assert mask_head._MAX_FEATURE_CHANNELS == native.MASK_HEAD_MAX_FEATURE_CHANNELS
    assert mask_head.MAX_LAYERS == native.MASK_HEAD_MAX_LAYERS
    reference_roi_align = importlib.import_module("fastdiffinst.reference.roi_align")
    assert reference_roi_align._MAX_ADAPTIVE_GRID == native.MAX_SAMPLING_RATIO


def test_an_extension_older_than_the_sources_is_named(monkeypatch):
    """A ``_C`` built before a limit was exported fails the import of the ops with what to do."""

    class OldExtension:  # the attributes of an older build: no MAX_LEVELS
        MAX_SAMPLING_RATIO = 1024

    monkeypatch.setattr(_extension, "_C", OldExtension)
    assert _extension.limit("MAX_SAMPLING_RATIO") == 1024
    message = ("fastdiffinst._C is older than the sources (no MAX_LEVELS): rebuild it with `make setup` or "
               "`pip install -e . --no-build-isolation`")
    with pytest.raises(ImportError, match=re.escape(message)):
        _extension.limit("MAX_LEVELS")


def test_has_kernel_rejects_unknown_device():
    assert not _extension.has_kernel("roi_align", "mps")


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_backend_info_names_cpp(op):
    info = fops.backend_info()
    assert set(PUBLIC_OPS) <= set(info)
    assert set(info[op]) == {"cpu", "cuda"}
    assert info[op]["cpu"].startswith("cpp:"), info[op]["cpu"]
    expected_cuda = "cpp:" if _extension.built_with_cuda() else "reference:"
    assert info[op]["cuda"].startswith(expected_cuda), info[op]["cuda"]
    assert _dispatch.resolve(op, "cpu") == "cpp"


class _Spy:
    """Counts calls to a native op and forwards them."""

    def __init__(self, op):
        self.op = op
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.op(*args, **kwargs)


def _roi_align_inputs():
    g = torch.Generator().manual_seed(101)
    x = torch.randn(2, 3, 11, 13, generator=g)
    rois = torch.tensor([[0, 1.5, 2.0, 9.0, 8.5], [1, -2.0, 3.0, 6.0, 12.0], [1, 4.0, 1.0, 12.5, 7.0]])
    return x, rois


def test_use_backend_switches_roi_align_to_reference_and_restores(monkeypatch):
    x, rois = _roi_align_inputs()
    spy = _Spy(torch.ops.fastdiffinst.roi_align)
    monkeypatch.setattr(torch.ops.fastdiffinst, "roi_align", spy)

    native = fops.roi_align(x, rois, (3, 5), 0.5, 2, True)
    assert spy.calls == 1

    with fops.use_backend("roi_align", "reference"):
        assert fops.backend_info()["roi_align"]["cpu"].startswith("reference: selected with use_backend")
        assert fops.backend_info()["multilevel_roi_align"]["cpu"].startswith("cpp:")  # other ops untouched
        assert _dispatch.resolve("roi_align", "cpu") == "reference"
        ref = fops.roi_align(x, rois, (3, 5), 0.5, 2, True)
        assert spy.calls == 1, "the native op ran although the reference backend was selected"
        # Nested selection wins inside, the outer one comes back after.
        with fops.use_backend("roi_align", "cpp"):
            fops.roi_align(x, rois, (3, 5), 0.5, 2, True)
            assert spy.calls == 2
        fops.roi_align(x, rois, (3, 5), 0.5, 2, True)
        assert spy.calls == 2

    torch.testing.assert_close(ref, native, rtol=1e-5, atol=1e-5)
    assert fops.backend_info()["roi_align"]["cpu"].startswith("cpp:")
    fops.roi_align(x, rois, (3, 5), 0.5, 2, True)
    assert spy.calls == 3


def test_use_backend_restores_after_exception():
    with pytest.raises(KeyError):
        with fops.use_backend("roi_align", "reference"):
            raise KeyError("boom")
    assert _dispatch.resolve("roi_align", "cpu") == "cpp"
    assert fops.backend_info()["roi_align"]["cpu"].startswith("cpp:")


def test_use_backend_switches_multilevel_to_reference(monkeypatch):
    g = torch.Generator().manual_seed(102)
    features = [torch.randn(2, 3, 9, 11, generator=g), torch.randn(2, 3, 5, 6, generator=g)]
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 8.0], [1, -4.0, -3.0, 40.0, 30.0], [1, 3.0, 3.0, 5.0, 7.0]])
    spy = _Spy(torch.ops.fastdiffinst.multilevel_roi_align)
    monkeypatch.setattr(torch.ops.fastdiffinst, "multilevel_roi_align", spy)
    args = ((2, 3), [0.25, 0.125], 2, True, 16, 3)

    native = fops.multilevel_roi_align(features, rois, *args)
    assert spy.calls == 1
    with fops.use_backend("multilevel_roi_align", "reference"):
        assert fops.backend_info()["multilevel_roi_align"]["cpu"].startswith("reference:")
        ref = fops.multilevel_roi_align(features, rois, *args)
    assert spy.calls == 1
    torch.testing.assert_close(ref, native, rtol=1e-5, atol=1e-5)
    fops.multilevel_roi_align(features, rois, *args)
    assert spy.calls == 2
    assert fops.backend_info()["multilevel_roi_align"]["cpu"].startswith("cpp:")


@pytest.mark.parametrize("op, name, match", [
    ("no_such_op", "cpp", "unknown op"),
    ("roi_align", "triton", "no backend"),
    ("multilevel_roi_align", "cuda", "no backend"),
])
def test_use_backend_rejects_unknown(op, name, match):
    with pytest.raises(ValueError, match=match):
        with fops.use_backend(op, name):
            pass
    assert _dispatch.resolve("roi_align", "cpu") == "cpp"


def test_set_input_checks_toggles():
    assert _dispatch.input_checks_enabled()  # conftest turns them on
    try:
        fops.set_input_checks(False)
        assert not _dispatch.input_checks_enabled()
    finally:
        fops.set_input_checks(True)
    assert _dispatch.input_checks_enabled()


def test_import_ops_is_light():
    code = (
        "import sys\n"
        "import fastdiffinst.ops\n"
        "heavy = ('fastdiffinst.modeling', 'fastdiffinst.data', 'fastdiffinst.engine', 'fastdiffinst.checkpoint',"
        " 'fastdiffinst.config')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'pycocotools', 'PIL', 'matplotlib')"
        " or any(m == h or m.startswith(h + '.') for h in heavy))\n"
        "assert 'fastdiffinst._C' in sys.modules, 'extension not loaded'\n"
        "print('BAD=' + ','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "BAD=\n" in result.stdout, result.stdout


def test_kernels_package_installed_under_fastdiffinst():
    """kernels/ installs as fastdiffinst.kernels (never as a bare top-level `kernels`)."""
    import fastdiffinst.kernels

    assert fastdiffinst.kernels.__name__ == "fastdiffinst.kernels"


def test_missing_kernel_falls_back_with_one_warning_or_fails_when_required(monkeypatch):
    """docs/design.md §3: without a native kernel an op runs its reference with one clear warning, and with
    FASTDIFFINST_REQUIRE_EXT=1 the fallback is an error (so parity tests never compare a reference
    with itself)."""
    monkeypatch.setitem(_dispatch._MISSING, ("roi_align", "cpp", "cpu"), "fastdiffinst._C has no cpu kernel")
    monkeypatch.setattr(_extension, "_warned", set())
    x = torch.randn(1, 2, 6, 7)
    rois = torch.tensor([[0.0, 0.5, 0.5, 5.0, 4.0]])
    monkeypatch.setenv("FASTDIFFINST_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="native kernel required"):
        fops.roi_align(x, rois, 2, 1.0, 2, True)
    monkeypatch.setenv("FASTDIFFINST_REQUIRE_EXT", "0")
    with pytest.warns(UserWarning, match="using the slow PyTorch reference on cpu"):
        out = fops.roi_align(x, rois, 2, 1.0, 2, True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per op and device
        again = fops.roi_align(x, rois, 2, 1.0, 2, True)
    torch.testing.assert_close(out, again)
    torch.testing.assert_close(out, torch.ops.fastdiffinst.roi_align(x, rois, 1.0, 2, 2, 2, True))
    assert fops.backend_info()["roi_align"]["cpu"].startswith("reference:")


@pytest.mark.parametrize("device", devices())
def test_a_refused_argument_reaches_python_as_an_exception(device):
    """A native op's C++ argument check (``TORCH_CHECK``) becomes a Python ``RuntimeError``, in a
    fresh process so that a crash fails this test rather than the run (on one H200 image every C++
    exception segfaulted: benchmarks/exception_probe.py, which gpu_check.sh runs, says where)."""
    from benchmarks.exception_probe import native_op_error

    result = native_op_error(device)
    assert result["status"] == 0, result
    assert "python exception: RuntimeError ddim_step_boxes: pred_boxes must have shape [1, 5, 4]" in result["stdout"]
