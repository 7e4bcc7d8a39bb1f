"""The GPU's attainable FP32 FMA rate on CUDA cores (no tensor cores), measured with a Triton loop of
independent FMA chains: the ceiling the dynamic-mask-head forward is reported against."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fma_loop(x_ptr, y_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(x_ptr + offs)
    b = a * 0.5
    c = a + 1.0
    d = a - 1.0
    for _ in range(ITERS):  # four independent chains per thread hide the FMA latency
        a = a * 0.9999 + 0.0001
        b = b * 0.9999 + 0.0001
        c = c * 0.9999 + 0.0001
        d = d * 0.9999 + 0.0001
    tl.store(y_ptr + offs, a + b + c + d)


def fma_peak_gflops(elements: int = 1 << 20, iters: int = 4096) -> float:
    from triton.testing import do_bench

    x = torch.randn(elements, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: _fma_loop[(elements // 256,)](x, y, ITERS=iters, BLOCK=256))
    return elements * iters * 4 * 2 / (ms * 1e-3) / 1e9
