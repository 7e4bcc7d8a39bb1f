"""Half-precision DiffusionInst (fastdiffinst.modeling.precision): what runs in half precision and
what stays fp32, the inference copies made once, mixed-precision training; and the DDIM step as one
graph without host synchronisation."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiffinst import ops
from fastdiffinst.common.boxes import signal_to_boxes
from fastdiffinst.modeling import DiffusionInst
from fastdiffinst.modeling.precision import (
    PackedConv2d,
    PackedLinear,
    conv_norm_pairs,
    emulation_reason,
    half_precision_copy,
    precision_dtype,
)
from fastdiffinst.modeling.resnet import ConvNorm, FrozenBatchNorm2d
from fastdiffinst.modeling.sampler import sampling_step
from fastdiffinst.modeling.swin import PatchEmbed
from test_losses import synthetic_batch
from test_model import images, small_model

HALF = ["bf16", "fp16"]
# Unit roundoff of each half format (half the distance between 1 and the next number).
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}


def _teacher_forced(model: DiffusionInst, batch, boxes: torch.Tensor):
    """Features and one decoder pass on fixed boxes, as inference runs them."""
    with torch.no_grad():
        features = model.extract_features(batch.tensor)
        return features, model.run_head(features, boxes, torch.tensor([999, 500]))


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 distance."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm())


def test_precision_is_named_and_checked():
    with pytest.raises(ValueError, match="precision must be one of \\('fp32', 'bf16', 'fp16'\\), got 'fp8'"):
        precision_dtype("fp8")
    model = small_model()
    assert model.precision == "fp32" and model.compute_dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        model.set_precision("half")
    assert model.precision == "fp32"
    with pytest.raises(TypeError, match="precision='bf16'"):
        model.to(torch.bfloat16).preprocess(images([(32, 32)]))
    # compile=True, or the DDIM step's torch.compile mode (CUDA graphs: "reduce-overhead").
    assert DiffusionInst(model.cfg, compile="reduce-overhead").compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match="compile must be True, False or a torch.compile mode"):
        DiffusionInst(model.cfg, compile="fast")


@pytest.mark.parametrize("precision", HALF)
def test_half_inference_computes_in_half_and_keeps_boxes_and_scores_fp32(precision):
    dtype = precision_dtype(precision)
    model = small_model()
    batch = model.preprocess(images([(64, 96), (50, 70)]))
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0]]).repeat(2, 32, 1) + torch.rand(2, 32, 4) * 10
    features, head = _teacher_forced(model, batch, boxes)
    model.set_precision(precision)
    half_features, half_head = _teacher_forced(model, batch, boxes)
    assert all(p.dtype == dtype for p in half_features.pyramid) and half_features.mask_feats.dtype == dtype
    assert half_head.class_logits.dtype == torch.float32 and half_head.boxes.dtype == torch.float32
    assert half_head.kernels.dtype == dtype  # read by the mask head with the mask features
    # Drift: every layer rounds its output to the half format (relative error <= u). Measured in units
    # of u over three seeds, bf16 and fp16 alike (AMD EPYC, AVX2: ATen's fp32-accumulating fallback
    # kernels), relative L2: mask features 2.7-3.2, logits 3.0-4.1, kernels 5.1-6.9; boxes, largest
    # error against the image's size: 0.7-1.1. Native kernels (AVX512-BF16, AMX) accumulate in fp32
    # too, in another order: the bounds leave 3x.
    u = UNIT_ROUNDOFF[precision]
    assert _rel(half_features.mask_feats, features.mask_feats) < 10 * u
    assert _rel(half_head.class_logits, head.class_logits) < 12 * u
    assert _rel(half_head.kernels, head.kernels) < 20 * u
    assert float((half_head.boxes - head.boxes).abs().max()) < 3.5 * u * 96
    # The parameters and the state dict stay fp32; the timestep embedding of the copy too.
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    copy = half_precision_copy(model.head, dtype)
    assert copy.time_mlp[0].freqs.dtype == torch.float32 and copy.time_mlp[1].weight.dtype == dtype
    assert not any(p.requires_grad for p in copy.parameters())
    results = model(images([(64, 96)]), generator=torch.Generator().manual_seed(0))[0]
    assert results["boxes"].dtype == torch.float32 and results["scores"].dtype == torch.float32
    assert len(results["scores"]) > 0 and results["masks"].dtype == torch.bool


def test_half_copies_are_made_once_and_follow_the_weights():
    model = small_model()
    model.set_precision("bf16")
    inputs = images([(64, 64)])
    model(inputs)
    copies = {name: module for name, (_, module) in model._half_copies._copies.items()}
    assert set(copies) == {"backbone", "mask_branch", "head"}
    model(inputs)
    assert all(model._half_copies._copies[name][1] is module for name, module in copies.items())
    # An in-place write remakes the copy of the module it changed, from the new weights.
    with torch.no_grad():
        model.head.head_series[0].norm1.weight.mul_(0.5)
    model(inputs)
    head = model._half_copies._copies["head"][1]
    assert head is not copies["head"] and model._half_copies._copies["backbone"][1] is copies["backbone"]
    assert torch.equal(head.head_series[0].norm1.weight, model.head.head_series[0].norm1.weight.bfloat16())
    # So does an optimizer step, fused ones too (the trainer's AdamW(fused=True) does not count its
    # writes in the tensors' _version: the copies went stale in train's periodic evaluation in bf16).
    for optimizer in (torch.optim.SGD(model.head.parameters(), lr=0.1),
                      torch.optim.AdamW(model.head.parameters(), lr=0.1, fused=True)):
        for p in model.head.parameters():
            p.grad = torch.ones_like(p)
        before = model._half_copies._copies["head"][1]
        optimizer.step()
        model(inputs)
        head = model._half_copies._copies["head"][1]
        assert head is not before
        assert torch.equal(head.head_series[0].norm1.weight, model.head.head_series[0].norm1.weight.bfloat16())
    assert all(p.grad is None and not p.requires_grad for p in head.parameters())  # the sources' grads stay behind
    # So do load_state_dict (in place) and a swapped pooler (another ops implementation).
    model.load_state_dict(small_model().state_dict())
    model(inputs)
    assert model._half_copies._copies["backbone"][1] is not copies["backbone"]
    before = model._half_copies._copies["head"][1]
    model.set_ops_impl("reference")
    model(inputs)
    assert model._half_copies._copies["head"][1] is not before
    # A copied or pickled model leaves the copies behind (a cache; on a CPU with bf16 instructions
    # they hold oneDNN tensors, which have no storage to copy) and makes its own.
    twin = copy.deepcopy(model)
    assert not twin._half_copies._copies
    torch.save(model, io.BytesIO())
    with torch.no_grad():
        boxes = [m(inputs, generator=torch.Generator().manual_seed(0))[0]["boxes"] for m in (twin, model)]
    assert torch.equal(*boxes)


def test_half_copies_fold_the_norms_and_run_channels_last_on_cpu():
    model = small_model()
    with torch.no_grad():  # statistics that make the folding do something
        generator = torch.Generator().manual_seed(0)
        for norm in model.modules():
            if isinstance(norm, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                for tensor, (low, high) in ((norm.running_mean, (-0.5, 0.5)), (norm.running_var, (0.5, 2.0)),
                                            (norm.weight, (0.5, 1.5)), (norm.bias, (-0.2, 0.2))):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    batch = model.preprocess(images([(64, 96)])).tensor
    with torch.no_grad():
        inputs = {"backbone": batch, "mask_branch": model.backbone(batch)}
    for name in ("backbone", "mask_branch"):
        source = getattr(model, name)
        norms = sum(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in source.modules())
        assert len(conv_norm_pairs(source)) == norms > 0  # every norm here follows a convolution
        for channels_last in (False, True):
            # In fp32 the copy differs from the source only by folding: w·s and b − mean·s rounded
            # once (~1e-7 relative each) instead of the norm's own roundings, compounded over the
            # <= 21 convolutions of official_small's path: far below 1e-5.
            folded = half_precision_copy(source, torch.float32, channels_last=channels_last)
            assert not conv_norm_pairs(folded)
            assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in folded.modules())
            assert all(p.is_contiguous(memory_format=torch.channels_last) == channels_last
                       for p in folded.parameters() if p.dim() == 4 and p.shape[2] > 1)
            with torch.no_grad():
                x = inputs[name]
                layout = torch.channels_last if channels_last else torch.contiguous_format
                x = x.contiguous(memory_format=layout) if name == "backbone" else \
                    [level.contiguous(memory_format=layout) for level in x]
                expected, actual = source(inputs[name]), folded(x)
            if name == "mask_branch":
                expected, actual = [expected], [actual]
            assert max(_rel(a, e) for a, e in zip(actual, expected)) < 1e-5
    # The norms stay in the model itself and in its state dict; GroupNorm is not folded (it
    # normalises by each input's own statistics).
    assert "backbone.bottom_up.stem.conv1.norm.running_mean" in model.state_dict()
    assert not conv_norm_pairs(small_model(backbone__resnet__norm="GN").backbone)
    # In half-precision inference on CPU the backbone and mask branch run channels-last (the
    # pyramid comes out NHWC for the RoI pooler); fp32 keeps the official NCHW.
    with torch.no_grad():
        assert model.extract_features(batch).pyramid[0].is_contiguous()
        model.set_precision("bf16")
        features = model.extract_features(batch)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in features.pyramid)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_linears_compute_what_the_linears_compute(precision):
    if emulation_reason(precision, "cpu") is not None:
        pytest.skip(emulation_reason(precision, "cpu"))
    dtype = precision_dtype(precision)
    head = small_model().head
    stage = head.head_series[0]
    torch.manual_seed(0)
    pro, roi = torch.randn(37, stage.d_model), torch.randn(37, 49, stage.d_model)
    time = torch.randn(2, 4 * stage.d_model)
    plain = half_precision_copy(head, dtype)
    packed = half_precision_copy(head, dtype, packed=True)
    # Every linear packed, DynamicConv's filter generator as its two filter matrices; the attention's
    # projections (read as tensors) and the fp32 timestep embedding left alone.
    packed_stage = packed.head_series[0]
    assert not any(type(m) is nn.Linear for m in packed.modules() if not isinstance(m, nn.MultiheadAttention))
    assert [layer.out_features for layer in packed_stage.inst_interact.dynamic_layer] == \
        [stage.inst_interact.num_params] * 2
    assert isinstance(packed_stage.linear1, PackedLinear) and isinstance(packed.time_mlp[1], PackedLinear)
    assert packed_stage.self_attn.in_proj_weight.dtype == dtype
    assert packed.time_mlp[0].freqs.dtype == torch.float32
    with torch.no_grad():
        pairs = [(plain.head_series[0].inst_interact(pro.to(dtype), roi.to(dtype)),
                  packed_stage.inst_interact(pro.to(dtype), roi.to(dtype))),
                 (plain.head_series[0].block_time_mlp(time.to(dtype)), packed_stage.block_time_mlp(time.to(dtype)))]
    for expected, actual in pairs:
        assert actual.dtype == dtype and actual.shape == expected.shape
        # The same products, blocked as oneDNN's packed layout wants: fp32 sums in another order
        # (measured 4.5e-7 relative against MKL's sgemm in fp32). In bf16 both are oneDNN's kernels
        # (bit-identical here, AVX512-BF16); another CPU's kernel may round an element to its
        # neighbour (2^-8 relative at most), which the layers after it carry: a bound of 2 units.
        assert _rel(actual, expected) < (1e-5 if precision == "fp32" else 2 * UNIT_ROUNDOFF["bf16"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_convolutions_compute_what_the_convolutions_compute(precision):
    if emulation_reason(precision, "cpu") is not None:
        pytest.skip(emulation_reason(precision, "cpu"))
    dtype = precision_dtype(precision)
    model = small_model()
    # A conv with a norm that is not folded (GroupNorm) keeps it after the packed conv.
    gn = nn.Sequential(ConvNorm(8, 16, 3, stride=2, norm="GN"), nn.ReLU())
    torch.manual_seed(0)
    nn.init.normal_(gn[0].norm.weight)
    nn.init.normal_(gn[0].norm.bias)
    patches = nn.Sequential(PatchEmbed(4, 3, 16, patch_norm=True))  # Swin's stem: a strided conv
    for module, channels in ((model.backbone, 3), (model.mask_branch, None), (gn, 8), (patches, 3)):
        plain = half_precision_copy(module, dtype, channels_last=True)
        packed = half_precision_copy(module, dtype, channels_last=True, packed=True)
        assert not any(isinstance(m, nn.Conv2d) for m in packed.modules())
        assert sum(isinstance(m, PackedConv2d) for m in packed.modules()) == \
            sum(isinstance(m, nn.Conv2d) for m in module.modules())
        # The first input fixes the packed layout; the second, of another size, reuses it.
        for height, width in ((64, 96), (96, 32)):
            if channels is None:  # the mask branch reads P2-P4
                x = [torch.randn(1, model.backbone.out_channels, height // s, width // s)
                     .to(dtype, memory_format=torch.channels_last) for s in model.backbone.out_strides]
            else:
                x = torch.randn(1, channels, height, width).to(dtype, memory_format=torch.channels_last)
            with torch.no_grad():
                outputs = [plain(x), packed(x)]
            for e, a in zip(*(o if isinstance(o, list) else [o] for o in outputs)):
                assert a.dtype == dtype and a.shape == e.shape
                # The same oneDNN kernels on a weight reordered once instead of on every call: measured
                # bit-identical here (fp32 and bf16). The second size runs on the first one's layout,
                # which another CPU may serve with another kernel (another fp32 sum order, some
                # elements rounded to their neighbour): such a change of kernel, measured here as
                # these modules' NCHW against their channels-last copies, moved the outputs by 0.0-0.76
                # bf16 units (the mask branch's five convolutions the most). The bound: 2 units.
                assert _rel(a, e) < (1e-5 if precision == "fp32" else 2 * UNIT_ROUNDOFF["bf16"])


def test_convolutions_packing_would_change_stay_as_they_are():
    # String padding, another padding mode, a subclass (it may compute something else) and a hooked
    # conv are left unpacked, not refused: the copy still runs them.
    class Standardised(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, (weight - weight.mean()) / weight.std(), bias)

    hooked = nn.Conv2d(4, 4, 1)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    module = nn.Sequential(nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                           Standardised(4, 4, 1), hooked, nn.Conv2d(4, 4, 1))
    packed = half_precision_copy(module, torch.float32, channels_last=True, packed=True)
    assert [type(m) for m in packed] == [nn.Conv2d, nn.Conv2d, Standardised, nn.Conv2d, PackedConv2d]
    with pytest.raises(ValueError, match="PackedConv2d computes an nn.Conv2d or ConvNorm"):
        PackedConv2d(module[2])
    x = torch.randn(1, 4, 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _rel(packed(x), module(x)) < 1e-5


@pytest.mark.parametrize("precision", HALF)
def test_mixed_precision_training_keeps_fp32_weights_boxes_and_logits(precision):
    model = small_model().train()
    model.set_precision(precision)
    images_, targets = synthetic_batch([(64, 96)], [2], 8, seed=3)
    out = model.training_outputs(images_, targets, generator=torch.Generator().manual_seed(0))
    assert out.features.mask_feats.dtype == precision_dtype(precision)  # autocast's convolutions
    assert out.head.boxes.dtype == torch.float32 and out.head.class_logits.dtype == torch.float32
    sum(out.losses.values()).backward()
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert not model._half_copies._copies  # training never uses the inference copies
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------
# The DDIM step as one graph

_HOST_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item", "equal", "is_nonzero"}


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def _step_inputs(model: DiffusionInst):
    batch = model.preprocess(images([(64, 64), (64, 48)]))
    with torch.no_grad():
        features = model.extract_features(batch.tensor)
    x_t = torch.randn(2, 32, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    noise, renew = ops.draw_ddim_noise(2, 32, torch.Generator().manual_seed(6))
    return (features.roi_levels, batch.images_whwh, x_t, signal_to_boxes(x_t, batch.images_whwh, 2.0), noise, renew)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ddim_step_is_one_graph_without_host_synchronisation(precision):
    model = small_model()
    model.set_precision(precision)
    levels, whwh, x_t, boxes, noise, renew = _step_inputs(model)
    with torch.no_grad():
        head = model._runner("head")  # the half-precision copy in bf16
    kwargs = dict(t=999, t_next=499, schedule=model.schedule(torch.device("cpu")), cfg=model.cfg.sampler,
                  ddim_step=model.impl.ddim_step)
    for step_noise in ((noise, renew), (None, None)):  # a step with its DDIM update; the final one
        with torch.no_grad():
            explanation = torch._dynamo.explain(sampling_step)(head, levels, whwh, x_t, boxes, *step_noise, **kwargs)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    recorder = _RecordOps()
    with torch.no_grad(), recorder:
        outputs = sampling_step(head, levels, whwh, x_t, boxes, noise, renew, **kwargs)
    assert not recorder.names & _HOST_SYNC, recorder.names & _HOST_SYNC
    assert "ddim_step_boxes" in recorder.names and "multilevel_roi_align" in recorder.names
    assert [tuple(o.shape) for o in outputs[3:]] == [(2, 32), (2, 32, 4), (2, 32, 4)]  # static shapes


def test_predictor_sets_the_precision():
    from fastdiffinst.predictor import Predictor

    model = small_model(input__min_size_test=48, input__max_size_test=64)  # no upscaling to 800 px
    image = images([(40, 56)])[0]
    predictor = Predictor(model, precision="bf16")
    assert model.precision == "bf16"
    half = predictor(image)
    assert half["boxes"].dtype == torch.float32 and half["masks"].shape[1:] == (40, 56)
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(model, precision="int8")
