"""``dynamic_mask_head`` and ``dynamic_mask_dice_sums``: the CondInst / DiffusionInst dynamic mask
head fused into one kernel (docs/design.md §2.1).

Per pixel ``u`` of instance ``n``'s image ``image_index[n]``: ``z1 = relu(W0 x_u + b0)``, ...,
``logit = W_last z + b_last``, with the instance's own filters taken from ``params[n]`` (AdelaiDet
layout: all weights, then all biases, each weight row-major ``[out, in]``). ``x_u`` is the
``mask_feats`` column at ``u``, preceded, for CondInst, by the relative coordinates
``(instance - pixel centre) / soi`` computed in-kernel. The official code tiles the features once
per instance and runs grouped convolutions; the fused kernels stream the features once per
instance and never materialise an ``[N, channels, H, W]`` tensor, and their backward recomputes the
activations (memory ``O(N·P + B·C·H·W)``). ``dynamic_mask_dice_sums`` fuses sigmoid and the dice
sums of training, so no ``[N, H, W]`` tensor is stored at all.

Backends (``use_backend("dynamic_mask_head", ...)``, covering both functions): ``"triton"`` (the
default on CUDA; on CPU tensors through the interpreter), ``"cpp"`` (the default on CPU) and
``"reference"`` (grouped convolutions, as the official code).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastdiffinst import _extension
from fastdiffinst.common import mask_head
from fastdiffinst.ops import _checks, _dispatch, _registration
from fastdiffinst.reference import dynamic_mask_head as reference

_OP = "dynamic_mask_head"
_DICE = "dynamic_mask_dice_sums"
_dispatch.register_op(
    _OP,
    {"cpp": "fastdiffinst._C C++ kernels", "triton": "Triton kernels (fastdiffinst.kernels)",
     "reference": "grouped convolutions, as the official code (fastdiffinst.reference)"},
    defaults={"cpu": "cpp", "cuda": "triton"},
)
MAX_CHANNELS = _extension.limit("MASK_HEAD_MAX_CHANNELS")
_MAX_FEATURE_CHANNELS = _extension.limit("MASK_HEAD_MAX_FEATURE_CHANNELS")
MAX_LAYERS = _extension.limit("MASK_HEAD_MAX_LAYERS")
RelCoords = reference.RelCoords


def num_params(in_channels: int, channels: int = 8, num_layers: int = 3, rel_coords: bool = False) -> int:
    """Filter length per instance: 153 for DiffusionInst (8 features, 8 channels, 3 layers), 169 for
    CondInst (the same plus 2 relative coordinates)."""
    return mask_head.num_params(in_channels + (mask_head.COORD_CHANNELS if rel_coords else 0), channels, num_layers)


class _HeadArgs(NamedTuple):
    """The scalar and coordinate arguments of both ops, checked and normalised as the kernels take
    them (:func:`_check`)."""

    channels: int
    num_layers: int
    inst_xy: Tensor | None  # [N, 2], None without relative coordinates
    inst_soi: Tensor | None  # [N]
    mask_stride: int  # 1 without relative coordinates


def _check(op: str, mask_feats: Tensor, params: Tensor, image_index: Tensor, channels: int, num_layers: int,
           rel_coords: RelCoords) -> _HeadArgs:
    """Shapes, dtypes and devices (values are checked by the kernels); returns the normalised
    arguments."""
    _check_tensors(op, mask_feats, params, image_index)
    channels = _checks.integer(op, "channels", channels)
    num_layers = _checks.integer(op, "num_layers", num_layers)
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"{op}: channels must be in [1, {MAX_CHANNELS}], got {channels}")
    if not 1 <= num_layers <= MAX_LAYERS:
        raise ValueError(f"{op}: num_layers must be in [1, {MAX_LAYERS}], got {num_layers}")
    inst_xy, inst_soi, mask_stride = None, None, 1
    if rel_coords is not None:
        inst_xy, inst_soi, mask_stride = _check_rel_coords(op, rel_coords, mask_feats, params)
    c = mask_feats.shape[1]
    expected = num_params(c, channels, num_layers, rel_coords is not None)
    if params.shape[1] != expected:
        coords = " + 2 relative coordinates" if rel_coords is not None else ""
        raise ValueError(f"{op}: params must have P = {expected} columns for {c} feature channels{coords}, "
                         f"{channels} channels and {num_layers} layers, got {params.shape[1]}")
    return _HeadArgs(channels, num_layers, inst_xy, inst_soi, mask_stride)


def _check_tensors(op: str, mask_feats: Tensor, params: Tensor, image_index: Tensor) -> None:
    """The three tensor arguments: types, ranks, dtypes, devices and the instance count."""
    _checks.require_tensor(op, "mask_feats", mask_feats)
    _checks.require_tensor(op, "params", params)
    _checks.require_tensor(op, "image_index", image_index)
    _checks.require_floating(op, "mask_feats", mask_feats)
    _checks.require_rank(op, "mask_feats", mask_feats, 4, "[B, C, H, W]")
    _checks.require_floating(op, "params", params)
    _checks.require_rank(op, "params", params, 2, "[N, P]")
    c = mask_feats.shape[1]
    if not 1 <= c <= _MAX_FEATURE_CHANNELS:
        raise ValueError(f"{op}: mask_feats must have 1 to {_MAX_FEATURE_CHANNELS} channels, got {c}")
    _checks.require_same_device(op, "params", params, "mask_feats", mask_feats)
    _checks.require_same_device(op, "image_index", image_index, "mask_feats", mask_feats)
    if params.dtype != mask_feats.dtype and not torch.is_autocast_enabled(mask_feats.device.type):
        raise TypeError(f"{op}: params must have the dtype of mask_feats ({mask_feats.dtype}), got {params.dtype}")
    if image_index.dtype != torch.int64:
        raise TypeError(f"{op}: image_index must be an int64 tensor, got dtype {image_index.dtype}")
    n = params.shape[0]
    if image_index.shape != (n,):
        raise ValueError(f"{op}: image_index must be [N] with N = params.shape[0] = {n}, "
                         f"got shape {tuple(image_index.shape)}")


def _check_rel_coords(op: str, rel_coords: RelCoords, mask_feats: Tensor,
                      params: Tensor) -> tuple[Tensor, Tensor, int]:
    """CondInst's ``(inst_xy [N, 2], soi [N], mask_stride)``, with the stride as an int."""
    if not isinstance(rel_coords, (tuple, list)) or len(rel_coords) != 3:
        raise TypeError(f"{op}: rel_coords must be a tuple (inst_xy [N, 2], soi [N], mask_stride), "
                        f"got {type(rel_coords).__name__}")
    inst_xy, inst_soi, stride = rel_coords
    n = params.shape[0]
    _checks.require_tensor(op, "rel_coords[0] (inst_xy)", inst_xy)
    _checks.require_tensor(op, "rel_coords[1] (soi)", inst_soi)
    _checks.require_floating(op, "rel_coords[0] (inst_xy)", inst_xy)
    _checks.require_floating(op, "rel_coords[1] (soi)", inst_soi)
    if inst_xy.shape != (n, 2):
        raise ValueError(f"{op}: rel_coords[0] (inst_xy) must be [N, 2] with N = {n}, "
                         f"got shape {tuple(inst_xy.shape)}")
    if inst_soi.shape != (n,):
        raise ValueError(f"{op}: rel_coords[1] (soi) must be [N] with N = {n}, got shape {tuple(inst_soi.shape)}")
    _checks.require_same_device(op, "rel_coords[0] (inst_xy)", inst_xy, "mask_feats", mask_feats)
    _checks.require_same_device(op, "rel_coords[1] (soi)", inst_soi, "mask_feats", mask_feats)
    stride = _checks.integer(op, "rel_coords[2] (mask_stride)", stride)
    if stride < 1:
        raise ValueError(f"{op}: rel_coords[2] (mask_stride) must be positive, got {stride}")
    return inst_xy, inst_soi, stride


def _check_targets(op: str, gt_masks: Tensor, gt_index: Tensor, mask_feats: Tensor, n: int) -> None:
    _checks.require_tensor(op, "gt_masks", gt_masks)
    _checks.require_tensor(op, "gt_index", gt_index)
    h, w = mask_feats.shape[2:]
    if gt_masks.dtype != torch.uint8:
        raise TypeError(f"{op}: gt_masks must be a uint8 tensor (nonzero = foreground), got dtype {gt_masks.dtype}")
    if gt_masks.dim() != 3 or tuple(gt_masks.shape[1:]) != (h, w):
        raise ValueError(f"{op}: gt_masks must be [G, {h}, {w}] (the mask-feature size), "
                         f"got shape {tuple(gt_masks.shape)}")
    if gt_index.dtype != torch.int64:
        raise TypeError(f"{op}: gt_index must be an int64 tensor, got dtype {gt_index.dtype}")
    if gt_index.shape != (n,):
        raise ValueError(f"{op}: gt_index must be [N] with N = {n}, got shape {tuple(gt_index.shape)}")
    _checks.require_same_device(op, "gt_masks", gt_masks, "mask_feats", mask_feats)
    _checks.require_same_device(op, "gt_index", gt_index, "mask_feats", mask_feats)


def dynamic_mask_head(mask_feats: Tensor, params: Tensor, image_index: Tensor, *, channels: int = 8,
                      num_layers: int = 3, rel_coords: RelCoords = None, sigmoid: bool = False) -> Tensor:
    """Runs every instance's dynamic filters over its image's mask features.

    Args:
        mask_feats: ``[B, C, H, W]`` mask features (fp32/fp16/bf16; fp64 on CPU).
        params: ``[N, P]`` per-instance filters, same dtype; P must equal
            :func:`num_params` ``(C, channels, num_layers, rel_coords is not None)``.
        image_index: ``[N]`` int64, the image of each instance.
        channels: hidden width (1..16). num_layers: 1..4 (ReLU between layers, none after the last).
        rel_coords: CondInst's relative coordinates, ``(inst_xy [N, 2], soi [N], mask_stride)``:
            instance locations in image pixels, sizes of interest, and the stride of the mask map.
        sigmoid: return probabilities instead of logits (fused).

    Returns:
        ``[N, H, W]`` logits (or probabilities) in ``mask_feats``' dtype, accumulated in fp32.
    """
    channels, num_layers, xy, soi, stride = _check(_OP, mask_feats, params, image_index, channels, num_layers,
                                                   rel_coords)
    backend = _dispatch.resolve(_OP, mask_feats.device.type)
    if backend == "reference":
        return reference.dynamic_mask_head(mask_feats, params, image_index, channels=channels, num_layers=num_layers,
                                           rel_coords=rel_coords, sigmoid=bool(sigmoid))
    # The synchronising range check before the Triton kernels, which otherwise write zeros for an
    # instance whose image is out of range (the C++ kernels check themselves).
    if backend == "triton" and _dispatch.input_checks_enabled():
        _checks.check_index_range(_OP, "image_index", image_index, 0, mask_feats.shape[0])
    op = (torch.ops.fastdiffinst.dynamic_mask_head_triton if backend == "triton"
          else torch.ops.fastdiffinst.dynamic_mask_head)
    return op(mask_feats, params, image_index, xy, soi, stride, channels, num_layers, bool(sigmoid))


def dynamic_mask_dice_sums(mask_feats: Tensor, params: Tensor, image_index: Tensor, gt_masks: Tensor,
                           gt_index: Tensor, *, channels: int = 8, num_layers: int = 3,
                           rel_coords: RelCoords = None) -> Tensor:
    """The dice sums of training, fused with the head: ``[N, 3]`` = (Σ p·g, Σ p², Σ g²) over the
    mask map, with ``p = sigmoid(logit)`` and ``g = gt_masks[gt_index[n]] != 0`` (0/1; 0 everywhere
    when ``gt_index[n] == -1``). Differentiable w.r.t. ``mask_feats`` and ``params``; no
    ``[N, H, W]`` tensor is stored. The dice loss is ``1 - 2·s0 / (s1 + s2 + eps)``
    (:func:`fastdiffinst.ops.dice_loss_from_sums`).

    Args:
        gt_masks: ``[G, H, W]`` uint8 targets at the mask-map resolution.
        gt_index: ``[N]`` int64 in ``[-1, G)``, the target of each instance.
        Other arguments as :func:`dynamic_mask_head`.

    Returns:
        ``[N, 3]`` fp32 (fp64 for fp64 features).
    """
    channels, num_layers, xy, soi, stride = _check(_DICE, mask_feats, params, image_index, channels, num_layers,
                                                   rel_coords)
    _check_targets(_DICE, gt_masks, gt_index, mask_feats, params.shape[0])
    backend = _dispatch.resolve(_OP, mask_feats.device.type)
    if backend == "reference":
        return reference.dynamic_mask_dice_sums(mask_feats, params, image_index, gt_masks, gt_index, channels=channels,
                                                num_layers=num_layers, rel_coords=rel_coords)
    if backend == "triton" and _dispatch.input_checks_enabled():
        _checks.check_index_range(_DICE, "image_index", image_index, 0, mask_feats.shape[0])
        _checks.check_index_range(_DICE, "gt_index", gt_index, -1, gt_masks.shape[0], " (-1 = no target)")
    op = (torch.ops.fastdiffinst.dynamic_mask_dice_sums_triton if backend == "triton"
          else torch.ops.fastdiffinst.dynamic_mask_dice_sums)
    return op(mask_feats, params, image_index, gt_masks, gt_index, xy, soi, stride, channels, num_layers)


class DynamicMaskHead(nn.Module):
    """Module form of :func:`dynamic_mask_head` for CondInst/DiffusionInst-style models.

    ``DynamicMaskHead(in_channels=8, channels=8, num_layers=3)`` is DiffusionInst's head
    (``num_params == 153``); ``rel_coords=True`` with ``mask_stride=8`` is CondInst's (169).
    It has no weights of its own: the filters are an input, predicted per instance.
    """

    def __init__(self, in_channels: int = 8, channels: int = 8, num_layers: int = 3, rel_coords: bool = False,
                 mask_stride: int = 4) -> None:
        super().__init__()
        self.in_channels = _checks.integer(_OP, "in_channels", in_channels)
        self.channels = _checks.integer(_OP, "channels", channels)
        self.num_layers = _checks.integer(_OP, "num_layers", num_layers)
        self.rel_coords = bool(rel_coords)
        self.mask_stride = _checks.integer(_OP, "mask_stride", mask_stride)
        self.num_params = num_params(self.in_channels, self.channels, self.num_layers, self.rel_coords)

    def _coords(self, inst_xy: Tensor | None, soi: Tensor | None) -> RelCoords:
        given = (inst_xy is not None, soi is not None)
        if given != (self.rel_coords, self.rel_coords):
            raise ValueError(f"{_OP}: this head was built with rel_coords={self.rel_coords}; pass inst_xy and soi "
                             f"{'both' if self.rel_coords else 'neither'}")
        return (inst_xy, soi, self.mask_stride) if self.rel_coords else None

    def forward(self, mask_feats: Tensor, params: Tensor, image_index: Tensor, inst_xy: Tensor | None = None,
                soi: Tensor | None = None, sigmoid: bool = False) -> Tensor:
        """``[N, H, W]`` logits (probabilities with ``sigmoid``)."""
        return dynamic_mask_head(mask_feats, params, image_index, channels=self.channels, num_layers=self.num_layers,
                                 rel_coords=self._coords(inst_xy, soi), sigmoid=sigmoid)

    def dice_sums(self, mask_feats: Tensor, params: Tensor, image_index: Tensor, gt_masks: Tensor, gt_index: Tensor,
                  inst_xy: Tensor | None = None, soi: Tensor | None = None) -> Tensor:
        """``[N, 3]`` fused dice sums (:func:`dynamic_mask_dice_sums`)."""
        return dynamic_mask_dice_sums(mask_feats, params, image_index, gt_masks, gt_index, channels=self.channels,
                                      num_layers=self.num_layers, rel_coords=self._coords(inst_xy, soi))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, channels={self.channels}, num_layers={self.num_layers}, "
                f"rel_coords={self.rel_coords}, mask_stride={self.mask_stride}, num_params={self.num_params}")


# ---------------------------------------------------------------------------------------------
# torch.library registrations: the C++ ops (schemas in csrc/) and the Triton ops (custom ops
# wrapping the launchers of fastdiffinst.kernels) get the same fake, autograd and autocast.

def _head_fake(mask_feats, params, image_index, inst_xy, inst_soi, mask_stride, channels, num_layers, sigmoid):
    torch._check(mask_feats.dim() == 4, lambda: "dynamic_mask_head: mask_feats must be 4-D")
    return mask_feats.new_empty((params.shape[0], mask_feats.shape[2], mask_feats.shape[3]))


def _head_backward_fake(grad, mask_feats, params, *args):
    return torch.empty_like(mask_feats), torch.empty_like(params)


def _dice_fake(mask_feats, params, image_index, gt_masks, gt_index, *args):
    dtype = torch.float64 if mask_feats.dtype == torch.float64 else torch.float32
    return mask_feats.new_empty((params.shape[0], 3), dtype=dtype)


def _dice_backward_fake(grad_sums, mask_feats, params, *args):
    return torch.empty_like(mask_feats), torch.empty_like(params)


def _autocast_inputs(device_type: str, mask_feats: Tensor, params: Tensor, *args) -> tuple:
    """Under autocast, fp32/fp16/bf16 features and filters run in the autocast dtype (like
    F.conv2d, which the official head uses); with an fp64 one (never cast down, as autocast does)
    both run in fp64. The coordinates are never cast (the kernels read them in fp32)."""
    if torch.float64 in (mask_feats.dtype, params.dtype):
        return (mask_feats.double(), params.double(), *args)
    dtype = torch.get_autocast_dtype(device_type)
    return (mask_feats.to(dtype), params.to(dtype), *args)


def _register_family(head: str, head_backward: str, dice: str, dice_backward: str) -> None:
    ops = torch.ops.fastdiffinst
    torch.library.register_fake(f"fastdiffinst::{head}", _head_fake)
    torch.library.register_fake(f"fastdiffinst::{head_backward}", _head_backward_fake)
    torch.library.register_fake(f"fastdiffinst::{dice}", _dice_fake)
    torch.library.register_fake(f"fastdiffinst::{dice_backward}", _dice_backward_fake)

    # Only the inputs are saved; the backward recomputes the activations.
    def head_setup(ctx, inputs, output):
        mask_feats, params, image_index, inst_xy, inst_soi = inputs[:5]
        ctx.save_for_backward(mask_feats, params, image_index, inst_xy, inst_soi)
        ctx.args = inputs[5:]

    def head_grad(ctx, grad):
        mask_feats, params, image_index, inst_xy, inst_soi = ctx.saved_tensors
        grad_feats, grad_params = getattr(ops, head_backward)(grad.contiguous(), mask_feats, params, image_index,
                                                              inst_xy, inst_soi, *ctx.args)
        return grad_feats, grad_params, None, None, None, None, None, None, None

    torch.library.register_autograd(f"fastdiffinst::{head}", head_grad, setup_context=head_setup)

    def dice_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7])
        ctx.args = inputs[7:]

    def dice_grad(ctx, grad_sums):
        mask_feats, params, image_index, gt_masks, gt_index, inst_xy, inst_soi = ctx.saved_tensors
        grad_feats, grad_params = getattr(ops, dice_backward)(grad_sums.contiguous(), mask_feats, params, image_index,
                                                              gt_masks, gt_index, inst_xy, inst_soi, *ctx.args)
        return (grad_feats, grad_params) + (None,) * 8

    torch.library.register_autograd(f"fastdiffinst::{dice}", dice_grad, setup_context=dice_setup)
    _registration.register_autocast(head, _autocast_inputs)
    _registration.register_autocast(dice, _autocast_inputs)


def _define_triton_ops() -> None:
    """The Triton kernels as custom ops (a ``triton_op`` cannot be compiled under the interpreter,
    docs/design.md §8), registered for every device: CUDA, and CPU through the interpreter."""
    from fastdiffinst.kernels import dynamic_mask_head as kernels

    def coords(inst_xy, inst_soi, mask_stride):
        return None if inst_xy is None else (inst_xy, inst_soi, mask_stride)

    @torch.library.custom_op("fastdiffinst::dynamic_mask_head_triton", mutates_args=())
    def head(mask_feats: Tensor, params: Tensor, image_index: Tensor, inst_xy: Tensor | None,
             inst_soi: Tensor | None, mask_stride: int, channels: int, num_layers: int, sigmoid: bool) -> Tensor:
        return kernels.forward(mask_feats, params, image_index, coords(inst_xy, inst_soi, mask_stride), channels,
                               num_layers, sigmoid)

    @torch.library.custom_op("fastdiffinst::_dynamic_mask_head_triton_backward", mutates_args=())
    def head_backward(grad: Tensor, mask_feats: Tensor, params: Tensor, image_index: Tensor, inst_xy: Tensor | None,
                      inst_soi: Tensor | None, mask_stride: int, channels: int, num_layers: int,
                      sigmoid: bool) -> tuple[Tensor, Tensor]:
        up = kernels.PROBS if sigmoid else kernels.LOGITS
        return kernels.backward(grad.to(mask_feats.dtype), up, mask_feats, params, image_index, None, None,
                                coords(inst_xy, inst_soi, mask_stride), channels, num_layers,
                                torch.are_deterministic_algorithms_enabled())

    @torch.library.custom_op("fastdiffinst::dynamic_mask_dice_sums_triton", mutates_args=())
    def dice(mask_feats: Tensor, params: Tensor, image_index: Tensor, gt_masks: Tensor, gt_index: Tensor,
             inst_xy: Tensor | None, inst_soi: Tensor | None, mask_stride: int, channels: int,
             num_layers: int) -> Tensor:
        return kernels.dice_sums(mask_feats, params, image_index, gt_masks, gt_index,
                                 coords(inst_xy, inst_soi, mask_stride), channels, num_layers)

    @torch.library.custom_op("fastdiffinst::_dynamic_mask_dice_sums_triton_backward", mutates_args=())
    def dice_backward(grad_sums: Tensor, mask_feats: Tensor, params: Tensor, image_index: Tensor, gt_masks: Tensor,
                      gt_index: Tensor, inst_xy: Tensor | None, inst_soi: Tensor | None, mask_stride: int,
                      channels: int, num_layers: int) -> tuple[Tensor, Tensor]:
        acc = torch.float64 if mask_feats.dtype == torch.float64 else torch.float32
        return kernels.backward(grad_sums.to(acc), kernels.DICE, mask_feats, params, image_index, gt_masks, gt_index,
                                coords(inst_xy, inst_soi, mask_stride), channels, num_layers,
                                torch.are_deterministic_algorithms_enabled())


try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - triton ships with torch's Linux wheels
    pass  # the "triton" backend then reports itself missing (fastdiffinst.ops._dispatch)
else:
    _define_triton_ops()
    _register_family("dynamic_mask_head_triton", "_dynamic_mask_head_triton_backward",
                     "dynamic_mask_dice_sums_triton", "_dynamic_mask_dice_sums_triton_backward")

if _extension.has_ops():
    _register_family("dynamic_mask_head", "_dynamic_mask_head_backward", "dynamic_mask_dice_sums",
                     "_dynamic_mask_dice_sums_backward")
