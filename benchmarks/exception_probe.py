"""Where C++ exceptions break, on a machine where they crash the process (issue seen on an H200
image: every exception raised by an extension, even a trivial ``load_inline`` ``TORCH_CHECK``,
ended in a segfault).

    python -m benchmarks.exception_probe [--out DIR] [--device cuda]

Each probe runs in a fresh process and is reported with its exit status (a negative status is the
signal that killed it, -11 a segfault), so one crash does not hide the others:

1. ``plain_cpp``: a C++ program built with the machine's ``c++``, throwing and catching in one
   frame chain (the compiler's runtime alone; no Python, no torch).
2. ``catch_inside``, ``throw_std``, ``throw_torch_check``: a ``load_inline`` extension whose
   functions throw and catch a ``std::runtime_error`` inside the extension, let one reach Python,
   and raise a ``TORCH_CHECK`` (a ``c10::Error``, whose constructor records a C++ backtrace),
   each again with ``TORCH_SHOW_CPP_STACKTRACES=1`` when it crashed without.
3. ``fastdiffinst_op_<device>``: one of our native ops refusing a bad argument (the dispatcher
   path, not pybind11).

With the environment that decides the outcome: the compiler, the C++ runtime libraries the process
maps (``libstdc++``, ``libgcc_s``), torch's C++ ABI and its compiler, and, when ``gdb`` exists,
the backtrace of the first crash. Each probe's line is printed, and the JSON rewritten, as soon as
it finishes, so that a caller's time limit keeps what ran.

Reading: (1) crashing means the machine's C++ runtime or sandbox is broken for every program;
``catch_inside`` crashing but not (1) points at the unwinder the Python process loaded; only
``throw_torch_check`` crashing points at c10's backtrace capture.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_EXTENSION = r"""
#include <torch/extension.h>
#include <stdexcept>

int catch_inside() {
  try {
    throw std::runtime_error("caught inside");
  } catch (const std::runtime_error&) {
    return 1;
  }
  return 0;
}
void throw_std() { throw std::runtime_error("probe: std::runtime_error"); }
void throw_torch_check() { TORCH_CHECK(false, "probe: TORCH_CHECK"); }
"""

_PLAIN = r"""
#include <cstdio>
#include <stdexcept>
static void thrower() { throw std::runtime_error("plain"); }
int main() {
  try { thrower(); } catch (const std::exception& e) { std::puts(e.what()); return 0; }
  return 1;
}
"""

_CALL = """
import sys, torch
from torch.utils.cpp_extension import load_inline
module = load_inline("fastdiffinst_exception_probe", cpp_sources=[{source!r}],
                     functions=["catch_inside", "throw_std", "throw_torch_check"], build_directory={build!r},
                     verbose=False)
name = sys.argv[1]
try:
    result = getattr(module, name)()
except RuntimeError as error:
    print("python exception:", type(error).__name__, str(error).splitlines()[0])
else:
    print("returned", result)
"""

_OP = """
import torch, fastdiffinst.ops  # noqa: F401  (registers the ops)
x = torch.zeros(1, 5, 4, dtype=torch.float64, device={device!r})
try:
    torch.ops.fastdiffinst.ddim_step_boxes(x, x[:, :3], torch.ones(1, 4, device={device!r}),
                                           torch.ones(1, 5, dtype=torch.bool, device={device!r}), 999, 749,
                                           torch.full((1000,), 0.5, dtype=torch.float64, device={device!r}), 1.0, 2.0,
                                           x, x)
except RuntimeError as error:
    print("python exception:", type(error).__name__, str(error).splitlines()[0])
else:
    print("no exception")
"""


def _run(argv: list[str], env: dict | None = None, timeout: int = 30) -> dict:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    return {"status": result.returncode, "stdout": result.stdout[-1000:], "stderr": result.stderr[-2000:]}


def _crashed(result: dict) -> bool:
    return isinstance(result.get("status"), int) and result["status"] < 0


def _gdb_backtrace(argv: list[str], env: dict) -> str | None:
    """The backtrace of the crash of ``argv`` under gdb, when gdb is installed."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return None
    out = _run([gdb, "-batch", "-ex", "run", "-ex", "bt 25", "--args", *argv], env=env, timeout=60)
    return (out.get("stdout", "") + out.get("stderr", ""))[-4000:]


def _environment() -> dict:
    import torch

    info: dict = {"python": sys.version.split()[0], "torch": torch.__version__,
                  "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
                  "torch_compiler": next((line.strip() for line in torch.__config__.show().splitlines()
                                          if "C++ Version" in line or "GCC" in line), None)}
    cxx = os.environ.get("CXX", "c++")
    version = _run([cxx, "--version"])
    info["cxx"] = version.get("stdout", "").splitlines()[:1]
    mapped = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if "libstdc++" in path or "libgcc_s" in path:
                mapped.add(path)
    info["runtime_libraries_mapped"] = sorted(mapped)
    return info


def probe(device: str = "cpu", report_to=None) -> dict:
    """Every probe in turn; ``report_to(report, name)`` is called after each one (the caller writes
    what is known so far: a stage timeout keeps what ran). gdb runs for the first crash only, and
    the ``TORCH_SHOW_CPP_STACKTRACES=1`` variant of a probe only when its ``=0`` one crashed."""
    report: dict = {"environment": _environment(), "probes": {}}
    state = {"gdb_used": False}

    def record(name: str, result: dict, argv: list[str] | None = None, env: dict | None = None) -> dict:
        if _crashed(result) and argv is not None and not state["gdb_used"]:
            state["gdb_used"] = True
            result["gdb"] = _gdb_backtrace(argv, env if env is not None else dict(os.environ))
        report["probes"][name] = result
        if report_to is not None:
            report_to(report, name)
        return result

    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.cpp"
        plain.write_text(_PLAIN)
        binary = Path(tmp) / "plain"
        build = _run([os.environ.get("CXX", "c++"), "-O2", str(plain), "-o", str(binary)], timeout=60)
        record("plain_cpp", _run([str(binary)]) if build["status"] == 0 else {"build": build}, [str(binary)])

        call = _CALL.format(source=_EXTENSION, build=tmp)
        # The first call builds the extension.
        record("build_and_catch_inside", _run([sys.executable, "-c", call, "catch_inside"], timeout=300))
        for name in ("catch_inside", "throw_std", "throw_torch_check"):
            for stacktraces in ("0", "1"):
                env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES=stacktraces)
                argv = [sys.executable, "-c", call, name]
                result = record(f"{name} (TORCH_SHOW_CPP_STACKTRACES={stacktraces})", _run(argv, env=env), argv, env)
                if not _crashed(result):
                    break
    for where in ("cpu", device) if device != "cpu" else ("cpu",):
        record(f"fastdiffinst_op_{where}", native_op_error(where, gdb=not state["gdb_used"]))
    return report


def native_op_error(device: str, gdb: bool = False) -> dict:
    """One of our native ops (``ddim_step_boxes``) refusing a bad shape on ``device``, in a fresh
    process: ``status`` 0 and ``stdout`` "python exception: RuntimeError ..." when the C++
    exception reached Python; with gdb's backtrace (``gdb``) when the process crashed."""
    argv = [sys.executable, "-c", _OP.format(device=device)]
    result = _run(argv, timeout=120)
    if gdb and _crashed(result):
        result["gdb"] = _gdb_backtrace(argv, dict(os.environ))
    return result


def result_line(name: str, result: dict) -> str:
    status = result.get("status", result.get("build", {}).get("status"))
    outcome = "ok" if status == 0 else ("SIGSEGV" if status == -11 else f"exit {status}")
    return f"- {name}: {outcome} {result.get('stdout', '').strip()[:120]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for exception_probe.json (rewritten after every probe)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="also probe our op on this device")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)

    def report_to(report: dict, name: str) -> None:
        print(result_line(name, report["probes"][name]), flush=True)
        if args.out is not None:
            (args.out / "exception_probe.json").write_text(json.dumps(report, indent=2) + "\n")

    report = probe(args.device, report_to)
    print(f"environment: {json.dumps(report['environment'])}")
    return 1 if any(r.get("status") != 0 for r in report["probes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
