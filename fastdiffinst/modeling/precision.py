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
import threading
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.optim.optimizer import register_optimizer_step_post_hook

from fastdiffinst.modeling.resnet import ConvNorm

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


def conv_norm_pairs(module: nn.Module) -> list[tuple[nn.Conv2d, nn.Module, nn.Module, str]]:
    """The batch norms that directly follow a convolution in ``module``, as ``(conv, norm, parent,
    name)`` (``getattr(parent, name) is norm``): a conv carrying its norm as the attribute ``norm``
    (detectron2's ``Conv2d(norm=...)``, :class:`~fastdiffinst.modeling.resnet.ConvNorm`) or a conv
    followed by its norm in an ``nn.Sequential``. Only norms with fixed statistics in inference
    (running mean and variance) count; GroupNorm normalises by each input's own statistics."""

    def foldable(norm: nn.Module) -> bool:
        return isinstance(getattr(norm, "running_mean", None), torch.Tensor) and \
            isinstance(getattr(norm, "running_var", None), torch.Tensor)

    pairs = []
    for parent in module.modules():
        if isinstance(parent, nn.Conv2d) and foldable(getattr(parent, "norm", None)):
            pairs.append((parent, parent.norm, parent, "norm"))
        elif isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            pairs += [(conv, norm, parent, name) for (_, conv), (name, norm) in zip(children, children[1:])
                      if isinstance(conv, nn.Conv2d) and foldable(norm)]
    return pairs


class PackedLinear(nn.Module):
    """``F.linear(x, weight, bias)`` for CPU inference through oneDNN, with ``weight [out, in]``
    reordered once into oneDNN's blocked layout (the reorder ``torch.compile``'s freezing makes).
    ``F.linear`` on a plain weight reorders blocks on every call and writes the broadcast bias into
    the output before the product (bf16, r50_coco's DynamicConv filter generation, 500 × 256 ×
    16 384: 13.3 ms against 10.1 packed). The same dot products: bit-identical to ``F.linear`` in
    bf16 on an AVX512-BF16 CPU (``tests/test_precision.py`` allows another CPU's kernels a last-bit
    difference). No autograd; ``x [..., in]`` -> ``[..., out]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        # Not a parameter or buffer: a oneDNN tensor has no storage to save, move or compare.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = None if bias is None else bias.detach()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# Held while a PackedConv2d packs its weight (once per convolution).
_PACKING = threading.Lock()


class PackedConv2d(nn.Module):
    """An ``nn.Conv2d`` (or a :class:`~fastdiffinst.modeling.resnet.ConvNorm` with the norm it
    applies after, when that norm was not folded) for CPU inference through oneDNN, its weight
    reordered once into the blocked layout oneDNN picks for the first input's shape (the reorder
    ``torch.compile``'s freezing makes; without a shape oneDNN picks a layout it must reorder again
    on every call). ``F.conv2d`` reorders the weight on every call: r50_coco's backbone + FPN in
    bf16 at 512², channels-last, ~0.20 s against ~0.19 s packed. The first shape fixes the layout
    for good; other shapes reuse it (a 512² layout at 800×1216 and 480×640 measured as fast as
    ``F.conv2d`` or faster; other batch sizes and NCHW inputs give the same results). The same
    products: bit-identical to ``F.conv2d`` on an AVX512-BF16 CPU. No autograd; ``x [B, C, H, W]``
    -> ``[B, out_channels, H', W']``. Only for convolutions :func:`packable`."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not packable(conv):
            raise ValueError(f"PackedConv2d computes an nn.Conv2d or ConvNorm with numeric zero padding and no "
                             f"hooks, got {type(conv).__name__}(padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r})")
        # Not parameters or buffers: the packed weight is a oneDNN tensor with no storage to save,
        # move or compare, and the plain one is dropped once packed.
        self.weight: torch.Tensor | None = conv.weight.detach()
        self.packed: torch.Tensor | None = None
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.norm = conv.norm if isinstance(conv, ConvNorm) else None
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            with _PACKING:  # two threads' first calls: one packs, the other then finds it packed
                if self.packed is None:
                    self.packed = torch.ops.mkldnn._reorder_convolution_weight(self.weight, *self.geometry,
                                                                               list(x.shape))
                    self.weight = None
        y = torch.ops.mkldnn._convolution_pointwise(x, self.packed, self.bias, *self.geometry, "none", [], "")
        return y if self.norm is None else self.norm(y)

    def extra_repr(self) -> str:
        padding, stride, dilation, groups = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={tuple(stride)}, "
                f"padding={tuple(padding)}, dilation={tuple(dilation)}, groups={groups}, bias={self.bias is not None}")


def packable(conv: nn.Module) -> bool:
    """Whether :class:`PackedConv2d` computes what ``conv`` computes: an ``nn.Conv2d`` or a
    ``ConvNorm`` (exactly: a subclass may compute something else), with numeric zero padding and no
    forward hooks."""
    return (type(conv) in (nn.Conv2d, ConvNorm) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and not conv._forward_hooks and not conv._forward_pre_hooks)


def pack_for_onednn(module: nn.Module) -> None:
    """Replaces, in place, every ``nn.Linear`` and every :func:`packable` convolution of ``module``
    (outside ``full_precision`` submodules) by a :class:`PackedLinear` or :class:`PackedConv2d`; other
    convolutions stay as they are. A parent that reads a linear's rows in blocks
    names it in ``packed_row_blocks`` (``{attribute: blocks}``): it becomes an ``nn.ModuleList`` of
    one :class:`PackedLinear` per equal block of rows. ``nn.MultiheadAttention``'s projections are
    read as tensors by its functional forward and stay."""
    for parent in list(module.modules()):
        if getattr(parent, "full_precision", False) or isinstance(parent, nn.MultiheadAttention):
            continue
        blocks = getattr(parent, "packed_row_blocks", {})
        for name, child in list(parent.named_children()):
            if packable(child):
                setattr(parent, name, PackedConv2d(child))
                continue
            if type(child) is not nn.Linear:
                continue
            count = blocks.get(name, 1)
            if child.out_features % count:
                raise ValueError(f"{type(parent).__name__}.{name} has {child.out_features} rows, not {count} "
                                 f"equal blocks (packed_row_blocks)")
            rows = child.out_features // count
            parts = [PackedLinear(child.weight[i * rows:(i + 1) * rows],
                                  None if child.bias is None else child.bias[i * rows:(i + 1) * rows])
                     for i in range(count)]
            setattr(parent, name, nn.ModuleList(parts) if name in blocks else parts[0])


def half_precision_copy(module: nn.Module, dtype: torch.dtype, channels_last: bool = False,
                        packed: bool = False) -> nn.Module:
    """An inference copy of ``module`` with its floating-point parameters and buffers in ``dtype``,
    except in submodules that declare ``full_precision = True``; no gradients.

    The batch norms that follow a convolution (:func:`conv_norm_pairs`) are folded into its weight
    and bias, in the source's precision before the cast (an inference-time norm is a per-channel
    affine map: one rounding fewer, and no pass over the activations). With ``channels_last`` the
    4-D weights are channels-last (NHWC), the layout that oneDNN's bf16 convolutions run fastest in
    on CPU; with ``packed`` its linear layers and convolutions are :class:`PackedLinear` and
    :class:`PackedConv2d` (:func:`pack_for_onednn`; CPU only, where oneDNN computes ``dtype``
    natively). Each tensor is cast straight into the copy
    (``deepcopy``'s memo), so the fp32 tensors and their gradients are not copied first."""
    kept = {id(t) for m in module.modules() if getattr(m, "full_precision", False)
            for t in itertools.chain(m.parameters(), m.buffers())}
    pairs = conv_norm_pairs(module)
    folded = {}
    with torch.no_grad():
        for conv, norm, _, _ in pairs:
            folded[id(conv)] = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                    norm.eps, norm.weight, norm.bias)
    memo: dict[int, object] = {}
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.is_floating_point():
                cast = tensor.detach().to(tensor.dtype if id(tensor) in kept else dtype, copy=True)
                memo[id(tensor)] = nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) \
                    else cast
        for conv, _, _, _ in pairs:
            memo[id(conv.weight)] = nn.Parameter(folded[id(conv)][0].detach().to(memo[id(conv.weight)].dtype),
                                                 requires_grad=False)
    result = copy.deepcopy(module, memo)
    for (conv, _, _, name), (conv_copy, _, parent_copy, _) in zip(pairs, conv_norm_pairs(result)):
        bias = folded[id(conv)][1].detach()
        conv_copy.bias = nn.Parameter(bias.to(conv_copy.weight.dtype), requires_grad=False)
        setattr(parent_copy, name, nn.Identity())
    if channels_last:
        result = result.to(memory_format=torch.channels_last)
    result.requires_grad_(False)
    if packed:
        pack_for_onednn(result)
    return result


class _OptimizerSteps:
    """The number of ``torch.optim`` optimizer steps taken in this process (a global step post-hook,
    registered once): fused optimizers (``AdamW(fused=True)``, what ``train`` uses) write the
    parameters in place without counting the writes in their ``_version``."""

    count = 0
    _hook = None

    @classmethod
    def watch(cls) -> None:
        if cls._hook is None:
            cls._hook = register_optimizer_step_post_hook(cls._step)

    @classmethod
    def _step(cls, optimizer, args, kwargs) -> None:
        cls.count += 1


class HalfPrecisionCopies:
    """Half-precision inference copies of named modules, each made on first use and remade only when
    its source changed: a parameter or buffer replaced or modified in place (``load_state_dict``, an
    in-place write; tensors count their in-place writes in ``_version``), any ``torch.optim``
    optimizer step (fused optimizers do not count theirs, :class:`_OptimizerSteps`), or a submodule
    swapped (e.g. the RoI pooler when the ops implementation changes)."""

    def __init__(self) -> None:
        self._copies: dict[str, tuple[tuple, nn.Module | Callable]] = {}
        _OptimizerSteps.watch()

    def __reduce__(self):
        # A cache derived from the weights: a copied or pickled model starts with none (the packed
        # linears' oneDNN tensors have no storage to copy or save) and makes its own on use.
        return (HalfPrecisionCopies, ())

    @staticmethod
    def _stamp(module: nn.Module, dtype: torch.dtype, channels_last: bool, packed: bool) -> tuple:
        tensors = itertools.chain(module.parameters(), module.buffers())
        return (dtype, channels_last, packed, _OptimizerSteps.count, tuple(id(m) for m in module.modules()),
                tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))

    def get(self, name: str, module: nn.Module, dtype: torch.dtype,
            wrap: Callable[[nn.Module], nn.Module | Callable], channels_last: bool = False,
            packed: bool = False) -> nn.Module | Callable:
        """The copy of ``module`` in ``dtype`` (see :func:`half_precision_copy`), passed through
        ``wrap`` (e.g. ``torch.compile``) when made."""
        stamp = self._stamp(module, dtype, channels_last, packed)
        entry = self._copies.get(name)
        if entry is None or entry[0] != stamp:
            entry = (stamp, wrap(half_precision_copy(module, dtype, channels_last, packed)))
            self._copies[name] = entry
        return entry[1]


__all__ = ["PRECISIONS", "HalfPrecisionCopies", "PackedConv2d", "PackedLinear", "at_least_fp32", "conv_norm_pairs",
           "emulation_reason", "half_precision_copy", "pack_for_onednn", "packable", "precision_dtype"]
