"""Registers, spills and shared memory of the dynamic mask head's Triton kernels, compiled ahead of
time for Hopper (sm_90a) at the configurations the launchers use; no GPU needed.

    python -m benchmarks.kernel_registers [--out DIR]

Each kernel is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and its PTX
assembled by Triton's own ``ptxas -v`` (the assembler a GPU run uses), whose report gives the
registers per thread and the spill bytes. A kernel above 128 registers fits fewer than 4 warps in
an SM sub-partition's register file (2 at 255: low occupancy); spills go to local memory. The
fp64 variants (gradcheck) and the reductions' smaller TILES for small maps are not listed. The compilation
runs in a fresh process with the interpreter off (``TRITON_INTERPRET=0``): the tests compile the
kernels this way too (tests/test_dynamic_mask_head.py).

The head: 8 feature channels, 8 hidden channels, 3 layers, without the relative coordinates
(DiffusionInst's head, 153 parameters) and with them (CondInst's, 169), fp32 (an fp16 output for
the probabilities' store).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import in_fresh_process

_TENSORS = dict(feats_ptr="*fp32", params_ptr="*fp32", image_ptr="*i64", xy_ptr="*fp32", soi_ptr="*fp32",
                gt_ptr="*u8", gt_index_ptr="*i64")
_SIZES = dict(B="i32", G="i32", W="i32", HW="i32", P="i32")


def launches(coords: bool) -> list[tuple[str, object, dict, dict, int]]:
    """``(label, kernel, signature, constants, num_warps)`` of every launch configuration of
    fastdiffinst/kernels/dynamic_mask_head.py's launchers, for the 8-channel, 3-layer head with or
    without the coordinates."""
    import torch

    from fastdiffinst.kernels import dynamic_mask_head as k

    geometry = k.geometry(8, 8 if coords else None, 8, 3, torch.float32)
    forward = dict(_TENSORS, out_ptr="*fp16", **_SIZES, CHUNKS="i32")
    backward = dict(_TENSORS, up_ptr="*fp32", gparams_ptr="*fp32", gfeats_ptr="*fp32", **_SIZES, CHUNKS="i32")
    feature_grad = dict(_TENSORS, up_ptr="*fp32", order_ptr="*i64", offsets_ptr="*i64", gfeats_ptr="*fp32", **_SIZES)
    out = [(f"forward probs BLOCK={c.kwargs['BLOCK']} TILES={c.kwargs['TILES']}", k.mask_head_forward_kernel, forward,
            dict(geometry, EPILOGUE=k.PROBS, **c.kwargs), c.num_warps) for c in k._FORWARD_CONFIGS]
    first = k._FORWARD_CONFIGS[0]
    out.append((f"forward logits BLOCK={first.kwargs['BLOCK']} TILES={first.kwargs['TILES']}",
                k.mask_head_forward_kernel, dict(forward, out_ptr="*fp32"), dict(geometry, EPILOGUE=k.LOGITS,
                                                                                  **first.kwargs), first.num_warps))
    out.append(("dice sums", k.mask_head_forward_kernel, dict(forward, out_ptr="*fp32"),
                dict(geometry, EPILOGUE=k.DICE, BLOCK=k._BLOCK, TILES=k._CHUNK_TILES), k._NUM_WARPS))
    for up, name in ((k.PROBS, "probs"), (k.DICE, "dice")):
        for atomic in (True, False):
            what = "atomic feature grad" if atomic else "parameter grads only (deterministic mode)"
            out.append((f"backward ({name} upstream, {what})", k.mask_head_backward_kernel, backward,
                        dict(geometry, UP=up, ATOMIC_GX=atomic, PREC=k.DOT_PRECISION, BLOCK=k._BLOCK,
                             TILES=k._CHUNK_TILES), k._NUM_WARPS))
        out.append((f"deterministic feature grad ({name} upstream)", k.mask_head_feature_grad_kernel, feature_grad,
                    dict(geometry, UP=up, BLOCK=k._BLOCK), k._NUM_WARPS))
    return out


def _ptxas_report(ptx: str, ptxas: str) -> dict:
    """Registers and spill bytes of ``ptx`` from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(source), "-o", str(Path(tmp) / "kernel.cubin")],
                                capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{result.stderr[-2000:]}")
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas report:\n{result.stderr[-2000:]}")
    return {"registers": int(registers.group(1)), "spill_store_bytes": int(spills.group(1)),
            "spill_load_bytes": int(spills.group(2))}


def compile_all() -> list[dict]:
    """One row per kernel configuration and head (with and without coordinates). Must run with the
    interpreter off."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_all needs TRITON_INTERPRET=0 (use report(), which starts a fresh process)")
    ptxas = get_ptxas(90).path
    rows = []
    for coords in (True, False):
        for label, kernel, signature, constants, warps in launches(coords):
            signature = dict(signature, **{name: "constexpr" for name in constants})
            compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": warps})
            rows.append({"kernel": label, "coords": coords, "num_warps": warps,
                         "shared_bytes": int(compiled.metadata.shared), **_ptxas_report(compiled.asm["ptx"], ptxas)})
    return rows


def report() -> list[dict]:
    """:func:`compile_all` in a fresh process with the interpreter off."""
    return in_fresh_process("benchmarks.kernel_registers:compile_all", env={"TRITON_INTERPRET": "0"}, timeout=900)


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | coords | warps | registers | spill stores / loads (bytes) | shared memory (bytes) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {'yes' if r['coords'] else 'no'} | {r['num_warps']} | {r['registers']} | "
                     f"{r['spill_store_bytes']} / {r['spill_load_bytes']} | {r['shared_bytes']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for kernel_registers.json and kernel_registers.md")
    args = parser.parse_args(argv)
    rows = report()
    table = markdown(rows)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_registers.json").write_text(json.dumps(rows, indent=2) + "\n")
        title = "# Triton kernels compiled for sm_90a (ptxas -v)"
        (args.out / "kernel_registers.md").write_text(f"{title}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
