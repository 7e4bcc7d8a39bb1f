"""The precision a :class:`~fastdiffinst.modeling.DiffusionInst` computes in (docs/precision.md).

* ``"fp32"`` — the official numerics (the default; the parity fixtures pin it).
* ``"bf16"`` / ``"fp16"`` — the dense layers (backbone, FPN, mask branch, decoder, DynamicConv) in
  half precision; the fused ops take the half-precision features as they are and accumulate in fp32.

Training in half precision is mixed precision: fp32 master weights, the forward under
``torch.autocast``. Inference runs on half-precision copies of the dense modules
(:class:`HalfPrecisionCopies`), cast once and remade only when the fp32 weights change, instead of
autocast's cast of every weight on every call.

What stays in fp32 or fp64 whatever the precision, each for a reason of magnitude:

* the timestep embedding's angles ``t·f`` (t up to 999: bf16 keeps 8 significant bits, so an angle
  near 999 would be off by up to 2 radians) — modules with ``full_precision = True`` are not cast;
* box regression: the deltas are applied to fp32 boxes in fp32 (a bf16 coordinate between 256 and
  512 px is a multiple of 2 px);
* the class logits leave the decoder in fp32 (scores, renewal threshold, top-k and NMS decide on them);
* the DDIM and corruption box math (fp64 in the ops, as the official code).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch
from torch import nn

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    """The compute dtype of ``precision`` (one of :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def emulation_reason(precision: str, device: torch.device | str) -> str | None:
    """Why ``precision`` would run emulated (tens of times slower than fp32) on ``device``, or None:
    on a CPU, half-precision matrix products and convolutions are fast only through oneDNN's kernels
    for CPUs with bf16 (AVX512-BF16, AMX) or fp16 (AVX512-FP16, AMX-FP16) instructions."""
    precision_dtype(precision)
    if precision == "fp32" or torch.device(device).type != "cpu":
        return None
    native = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
              "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}[precision]()
    if native:
        return None
    needs = {"bf16": "AVX512-BF16 or AMX", "fp16": "AVX512-FP16 or AMX-FP16"}[precision]
    return (f"this CPU has no {precision} matrix instructions ({needs}): {precision} would run emulated, tens of "
            f"times slower than fp32")


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` promoted to fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def half_precision_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An inference copy of ``module`` with its floating-point parameters and buffers in ``dtype``,
    except in submodules that declare ``full_precision = True``; no gradients. Each tensor is cast
    straight into the copy (``deepcopy``'s memo), so the fp32 tensors and their gradients are not
    copied first."""
    kept = {id(t) for m in module.modules() if getattr(m, "full_precision", False)
            for t in itertools.chain(m.parameters(), m.buffers())}
    memo: dict[int, object] = {}
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.is_floating_point():
                cast = tensor.detach().to(tensor.dtype if id(tensor) in kept else dtype, copy=True)
                memo[id(tensor)] = nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) \
                    else cast
    return copy.deepcopy(module, memo).requires_grad_(False)


class HalfPrecisionCopies:
    """Half-precision inference copies of named modules, each made on first use and remade only when
    its source changed: a parameter or buffer replaced or modified in place (an optimizer step,
    ``load_state_dict``; tensors count their in-place writes in ``_version``), or a submodule
    swapped (e.g. the RoI pooler when the ops implementation changes)."""

    def __init__(self) -> None:
        self._copies: dict[str, tuple[tuple, nn.Module | Callable]] = {}

    @staticmethod
    def _stamp(module: nn.Module, dtype: torch.dtype) -> tuple:
        tensors = itertools.chain(module.parameters(), module.buffers())
        return (dtype, tuple(id(m) for m in module.modules()),
                tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))

    def get(self, name: str, module: nn.Module, dtype: torch.dtype,
            wrap: Callable[[nn.Module], nn.Module | Callable]) -> nn.Module | Callable:
        """The copy of ``module`` in ``dtype``, passed through ``wrap`` (e.g. ``torch.compile``)
        when made."""
        stamp = self._stamp(module, dtype)
        entry = self._copies.get(name)
        if entry is None or entry[0] != stamp:
            entry = (stamp, wrap(half_precision_copy(module, dtype)))
            self._copies[name] = entry
        return entry[1]


__all__ = ["PRECISIONS", "HalfPrecisionCopies", "at_least_fp32", "emulation_reason", "half_precision_copy",
           "precision_dtype"]
