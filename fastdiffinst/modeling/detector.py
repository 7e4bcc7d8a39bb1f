"""DiffusionInst (docs/official-model.md §1, §3, §5): backbone + FPN, mask branch, DiffusionDet
decoder with the controller, DDIM sampling over boxes, and post-processing to instances.

``DiffusionInst(cfg, ops_impl="fused")`` runs on the fused ops (multi-level RoIAlign, box
diffusion, dynamic mask head, mask pasting); ``ops_impl="reference"`` runs the same weights on the
official formulations (:mod:`fastdiffinst.modeling.implementation` holds both). Backbone, FPN and
mask features are computed once per image batch, not once per DDIM step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastdiffinst import ops
from fastdiffinst.common.diffusion import DiffusionSchedule, cosine_schedule
from fastdiffinst.config import ModelConfig
from fastdiffinst.modeling.corruption import noisy_proposals
from fastdiffinst.modeling.dynamic_head import DynamicHead
from fastdiffinst.modeling.fpn import FPN
from fastdiffinst.modeling.implementation import FUSED, OpsImplementation, ops_implementation
from fastdiffinst.modeling.losses import SetCriterion
from fastdiffinst.modeling.mask_branch import MaskBranch
from fastdiffinst.modeling.matcher import Match
from fastdiffinst.modeling.postprocess import (
    Candidates,
    paste_in_chunks,
    scale_and_clip_boxes,
    select_detections,
    topk_candidates,
)
from fastdiffinst.modeling.precision import HalfPrecisionCopies, emulation_reason, precision_dtype
from fastdiffinst.modeling.resnet import ResNet
from fastdiffinst.modeling.sampler import (
    DrawFn,
    DrawSource,
    GeneratorDraws,
    HeadOutput,
    OfficialDraws,
    SamplingStep,
    ddim_sample,
    sampling_step,
)
from fastdiffinst.modeling.targets import TrainingTargets, prepare_targets

# torch.compile modes accepted for the DDIM step (compile="reduce-overhead": CUDA graphs on a GPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Proposals per recomputed DynamicConv chunk in the fused backward.
DYNAMIC_CONV_CHUNK = 256

# The modules that are convolutions (and norms, activations) over images: channels-last candidates.
CONVOLUTIONAL = ("backbone", "mask_branch")


# The largest pixel magnitude accepted (16-bit images fit): beyond it, an input is no image, and its
# features would overflow into errors that name the RoIAlign boxes instead of the image.
MAX_PIXEL = 65535.0

@dataclass
class ImageBatch:
    """Normalised images padded to a multiple of the size divisibility.

    ``tensor [B, 3, Hp, Wp]`` (zero padding after normalisation, bottom/right), ``image_sizes``
    the unpadded (h, w) of each image, ``images_whwh [B, 4]`` fp32 (w, h, w, h)."""

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    images_whwh: Tensor


@dataclass
class Features:
    """What the sampler reuses across DDIM steps: ``pyramid`` P2–P5, ``mask_feats
    [B, 8, Hp/4, Wp/4]``, and ``roi_levels``, the levels the RoI pooler reads: on the fused path
    on CPU channels-last copies of the pyramid (the layout the C++ RoIAlign kernels read, made once
    per batch instead of once per decoder stage and step), otherwise the pyramid itself (the CUDA
    kernels read NCHW)."""

    pyramid: list[Tensor]
    mask_feats: Tensor
    roi_levels: list[Tensor]

    @staticmethod
    def cat(parts: Sequence[Features]) -> Features:
        """The features of consecutive image chunks as one batch."""
        if len(parts) == 1:
            return parts[0]
        return Features([torch.cat(level) for level in zip(*(p.pyramid for p in parts))],
                        torch.cat([p.mask_feats for p in parts]),
                        [torch.cat(level) for level in zip(*(p.roi_levels for p in parts))])


@dataclass
class TrainingOutputs:
    """The training forward's intermediates: the batch, the checked targets, the noisy proposals
    ``boxes [B, N, 4]`` (float64) at timesteps ``t [B]``, features, head outputs, the loss dict and
    the matches of every stage (the last stage first, then stages 0, 1, ..., as the official code)."""

    batch: ImageBatch
    targets: TrainingTargets
    boxes: Tensor
    t: Tensor
    features: Features
    head: HeadOutput
    losses: dict[str, Tensor]
    matches: list[list[Match]]


def build_bottom_up(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone.name == "resnet":
        return ResNet(cfg.backbone.resnet)
    from fastdiffinst.modeling.swin import SwinTransformer

    swin = cfg.backbone.swin
    return SwinTransformer(embed_dim=swin.embed_dim, depths=tuple(swin.depths), num_heads=tuple(swin.num_heads),
                           window_size=swin.window_size, mlp_ratio=swin.mlp_ratio, drop_path_rate=swin.drop_path_rate)


class DiffusionInst(nn.Module):
    """The model. ``model(images)`` (eval mode) returns one dict per image with ``boxes [M, 4]``
    (fp32 xyxy in output pixels), ``scores [M]``, ``labels [M]`` int64 and ``masks [M, H, W]``
    bool, in descending score order; ``model(images, targets)`` (training mode) the loss dict.

    Args:
        cfg: a :class:`fastdiffinst.config.ModelConfig` (see ``fastdiffinst.config.get_config``).
        ops_impl: ``"fused"`` (our kernels) or ``"reference"`` (the official formulations).
        compile: ``torch.compile`` the backbone and the mask branch, and on the fused ops each DDIM
            step whole (decoder, renewal and box update, one ``fullgraph`` graph with static shapes
            and no host synchronisation; on the official formulations the decoder alone). A string
            is the step's ``torch.compile`` mode, one of :data:`COMPILE_MODES`:
            ``"reduce-overhead"`` captures each step as a CUDA graph on a GPU.
        recompute: train with recomputation instead of stored activations (see
            :meth:`set_recompute`; default on for ``"fused"``, off for ``"reference"``).
        precision: ``"fp32"`` (the official numerics), ``"bf16"`` or ``"fp16"`` (see
            :mod:`fastdiffinst.modeling.precision`, :meth:`set_precision`). The parameters and the
            state dict stay fp32 in every precision.
    """

    def __init__(self, cfg: ModelConfig, ops_impl: str = "fused", compile: bool | str = False,
                 recompute: bool | None = None, precision: str = "fp32") -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.set_precision(precision)
        self._half_copies = HalfPrecisionCopies()
        if compile is not True and compile is not False and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be True, False or a torch.compile mode {COMPILE_MODES}, got {compile!r}")
        self.compiled = compile is not False
        self.compile_mode = compile if isinstance(compile, str) else None
        self._compiled_step: Callable[..., tuple[Tensor, ...]] | None = None
        head_cfg = cfg.head
        self.impl = ops_implementation(ops_impl)
        self.backbone = FPN(build_bottom_up(cfg), cfg.backbone.fpn_channels)
        self.mask_branch = MaskBranch(cfg.backbone.fpn_channels, head_cfg.mask_branch_channels,
                                      head_cfg.mask_tower_convs, head_cfg.mask_feat_channels)
        self.num_kernel_params = ops.dynamic_mask_head_num_params(head_cfg.mask_feat_channels,
                                                                  head_cfg.mask_head_channels,
                                                                  head_cfg.mask_head_layers)
        self.head = DynamicHead(head_cfg, cfg.num_classes, self.num_kernel_params, self._pooler(self.impl))
        self.register_buffer("pixel_mean", torch.tensor(cfg.input.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.input.pixel_std).view(3, 1, 1), persistent=False)
        self.criterion = SetCriterion(cfg)
        self._schedules: dict[torch.device, DiffusionSchedule] = {}
        self.set_recompute(self.impl is FUSED if recompute is None else recompute)
        # A plain dict, so the compiled wrappers are not registered as submodules (their
        # parameters would appear twice in the state dict).
        self._runners = {name: self._wrap(name, getattr(self, name)) for name in ("backbone", "mask_branch", "head")}

    # ------------------------------------------------------------------------------------------
    # Configuration

    @property
    def ops_impl(self) -> str:
        """The name of the ops implementation the model runs on (``"fused"`` or ``"reference"``)."""
        return self.impl.name

    def set_ops_impl(self, ops_impl: str) -> None:
        """Switches between our kernels (``"fused"``) and the official formulations
        (``"reference"``) for the same weights (see :mod:`fastdiffinst.modeling.implementation`).
        The recomputation setting is kept as it is: the constructor's default follows ``ops_impl``,
        a switch does not (call :meth:`set_recompute` to change it too)."""
        self.impl = ops_implementation(ops_impl)
        self.head.box_pooler = self._pooler(self.impl)

    def set_precision(self, precision: str) -> None:
        """``"fp32"``, ``"bf16"`` or ``"fp16"``: training then runs under ``torch.autocast`` in that
        dtype (fp32 master weights), inference on half-precision copies of the backbone, mask branch
        and decoder made once (remade when the weights change). fp32 is exactly the official
        numerics."""
        self.compute_dtype = precision_dtype(precision)
        self.precision = precision

    def set_recompute(self, enabled: bool) -> None:
        """Training recomputes the backbone's trainable stages, the decoder stages and DynamicConv
        (chunks of :data:`DYNAMIC_CONV_CHUNK` proposals) in the backward instead of storing their
        activations: exact (the same losses and gradients), about half the training memory, a second
        forward of those parts. The constructor's default: on for ``"fused"``, off for
        ``"reference"`` (the official code's memory use)."""
        enabled = bool(enabled)
        # The backbone's and the decoder's activations and DynamicConv's generated filters dominate
        # training memory; the mask branch is always stored (its BatchNorm would update its running
        # statistics again when recomputed).
        self.head.recompute_stages = enabled
        self.backbone.bottom_up.recompute = enabled
        for stage in self.head.head_series:
            stage.inst_interact.recompute_chunk = DYNAMIC_CONV_CHUNK if enabled else None

    def _pooler(self, impl: OpsImplementation) -> nn.Module:
        head_cfg = self.cfg.head
        scales = [1.0 / s for s in self.backbone.out_strides]
        return impl.pooler(head_cfg.pooler_resolution, scales, head_cfg.pooler_sampling_ratio)

    def _wrap(self, name: str, module: nn.Module) -> nn.Module | Callable:
        """``module`` as the forward runs it: itself, or compiled (the decoder in one graph)."""
        if not self.compiled:
            return module
        return torch.compile(module, fullgraph=name == "head")

    def _inferring(self) -> bool:
        """Whether this forward is inference: eval mode, no gradients. (In training mode the mask
        branch's BatchNorm uses and updates the batch's statistics.)"""
        return not (self.training or torch.is_grad_enabled())

    def _half_inference(self) -> bool:
        """Whether this forward runs on the half-precision copies: inference in bf16 or fp16 (a
        training-mode forward must update the model's own BatchNorm statistics)."""
        return self.precision != "fp32" and self._inferring()

    def _runner(self, name: str) -> nn.Module | Callable:
        """The backbone (with FPN), the mask branch or the decoder as this forward runs it: the model's
        own modules in fp32 and in training (autocast does the casting there), otherwise their
        half-precision copies."""
        if not self._half_inference():
            return self._runners[name]
        return self._half_copies.get(name, getattr(self, name), self.compute_dtype, lambda m: self._wrap(name, m),
                                     channels_last=name in CONVOLUTIONAL and self._channels_last(),
                                     packed=self._packed())

    def _channels_last(self) -> bool:
        """Whether this forward runs the convolutional modules (:data:`CONVOLUTIONAL`) channels-last:
        half-precision inference on CPU, where oneDNN's bf16 convolutions and the stem's max-pool
        are faster in NHWC (r50_coco, 512², 1 step: 0.68 against 0.83 s per image in bf16). fp32
        keeps NCHW, the official numerics; on a GPU it is not measured yet."""
        return self._half_inference() and self.device.type == "cpu"

    def _packed(self) -> bool:
        """Whether the half-precision copies' linear layers and convolutions are oneDNN-packed
        (``PackedLinear``, ``PackedConv2d``): eager half-precision inference on a CPU that computes
        the precision natively (oneDNN's half-precision kernels need those instructions). Under
        ``torch.compile`` inductor plans the products itself. r50_coco, 512², bf16:
        docs/precision.md."""
        return (self._channels_last() and not self.compiled
                and emulation_reason(self.precision, self.device) is None)

    def schedule(self, device: torch.device) -> DiffusionSchedule:
        """The float64 cosine schedule on ``device`` (kept out of the buffers: it is derived, and
        must stay float64 whatever the model's dtype)."""
        if device not in self._schedules:
            base = cosine_schedule()
            self._schedules[device] = DiffusionSchedule(*(getattr(base, f).to(device)
                                                          for f in base.__dataclass_fields__))
        return self._schedules[device]

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------------------------------
    # Pieces of the forward pass

    def preprocess(self, images: Sequence[Tensor] | Tensor, square: int = 0) -> ImageBatch:
        """RGB images ``[3, H, W]`` (0–255, any real dtype; NaN, inf and values beyond ±``MAX_PIXEL``
        are refused), or a ``[B, 3, H, W]`` tensor, ->
        normalised :class:`ImageBatch`, padded to the largest image or to ``square × square`` if
        larger, rounded up to the backbone's size divisibility."""
        if isinstance(images, Tensor):
            if images.dim() != 4:
                raise ValueError(f"images must be a list of [3, H, W] tensors or one [B, 3, H, W] tensor, "
                                 f"got a tensor of shape {tuple(images.shape)}")
            images = list(images)
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError("images must be a non-empty list of [3, H, W] tensors")
        for i, image in enumerate(images):
            if not isinstance(image, Tensor):
                raise TypeError(f"images[{i}] must be a Tensor, got {type(image).__name__}")
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"images[{i}] must be [3, H, W] (RGB, channels first), got shape {tuple(image.shape)}")
            if image.dtype == torch.bool or image.is_complex():
                raise TypeError(f"images[{i}] must be real-valued (uint8 or float 0-255), got {image.dtype}")
            if image.shape[1] < 1 or image.shape[2] < 1:
                raise ValueError(f"images[{i}] is empty: shape {tuple(image.shape)}")
        dtype = self.pixel_mean.dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"DiffusionInst's weights are float32 or float64, not {dtype}: keep them in float32 and "
                            f"ask for DiffusionInst(..., precision='bf16') or model.set_precision('bf16')")
        divisor = self.backbone.size_divisibility
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        pad_h = -(-max(square, *(h for h, _ in sizes)) // divisor) * divisor
        pad_w = -(-max(square, *(w for _, w in sizes)) // divisor) * divisor
        batch = torch.zeros((len(images), 3, pad_h, pad_w), dtype=dtype, device=self.device)
        for i, (image, (h, w)) in enumerate(zip(images, sizes)):
            batch[i, :, :h, :w] = (image.to(self.device, dtype) - self.pixel_mean) / self.pixel_std
        # Integer pixels are in range; one check of the whole normalised batch (a single device sync)
        # and, only when it fails, a look at each image to name the culprits. NaN fails the
        # comparison too.
        if any(image.is_floating_point() for image in images):
            inputs = self.cfg.input  # the normalisation's constants, read without a device sync
            bound = (MAX_PIXEL + max(map(abs, inputs.pixel_mean))) / min(inputs.pixel_std)
            if not bool((batch.abs() <= bound).all()):
                bad = [i for i in range(len(images)) if not bool((batch[i].abs() <= bound).all())]
                raise ValueError(f"images[{', '.join(map(str, bad))}] (of {len(images)}) "
                                 f"ha{'ve' if len(bad) > 1 else 's'} non-finite or out-of-range pixel values (NaN, "
                                 f"inf, or beyond ±{MAX_PIXEL:g}; images are 0–255)")
        whwh = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32, device=self.device)
        return ImageBatch(batch, sizes, whwh)

    def extract_features(self, images: Tensor) -> Features:
        """``[B, 3, Hp, Wp]`` -> P2–P5 and the mask features, computed once (in half precision
        when the model infers in one). Inference on CPU runs them one image at a time: layer by
        layer over a whole batch, every activation streams through memory (one 512² image's P2 is
        16 MB and stays in cache), which cost r50_coco at 512² 1.14 s per image at batch 8 against
        0.96 s one at a time (the results are identical). Training keeps the batch (the mask
        branch's BatchNorm normalises over it)."""
        if self._half_inference():
            images = images.to(self.compute_dtype, memory_format=torch.channels_last if self._channels_last()
                               else torch.contiguous_format)
        chunk = images.shape[0]
        if images.device.type == "cpu" and self._inferring():
            chunk = 1
        backbone = self._runner("backbone")
        return Features.cat([self.pyramid_features(backbone(images[i:i + chunk]))
                             for i in range(0, images.shape[0], chunk)])

    def pyramid_features(self, pyramid: list[Tensor]) -> Features:
        """P2–P5 -> :class:`Features` (the mask branch and the levels the RoI pooler reads)."""
        roi_levels = pyramid
        if self.impl.channels_last_levels and pyramid[0].device.type == "cpu":
            roi_levels = [p.contiguous(memory_format=torch.channels_last) for p in pyramid]
        return Features(pyramid, self._runner("mask_branch")(pyramid), roi_levels)

    def run_head(self, features: Features, boxes: Tensor, t: Tensor) -> HeadOutput:
        """The decoder on ``boxes [B, N, 4]`` at timesteps ``t [B]``."""
        return HeadOutput(*self._runner("head")(features.roi_levels, boxes, t))

    def mask_logits(self, mask_feats: Tensor, kernels: Tensor, image_index: Tensor, sigmoid: bool = False) -> Tensor:
        """Dynamic mask head: ``kernels [n, P]`` of instances of images ``image_index [n]`` on
        ``mask_feats [B, C, H, W]`` -> ``[n, H, W]`` logits (probabilities with ``sigmoid``)."""
        head = self.cfg.head
        return self.impl.mask_head(mask_feats, kernels, image_index, channels=head.mask_head_channels,
                                   num_layers=head.mask_head_layers, sigmoid=sigmoid)

    @torch.no_grad()
    def sample(self, features: Features, images_whwh: Tensor, generator: torch.Generator | None = None,
               draws: DrawFn | DrawSource | None = None) -> list[SamplingStep]:
        """DDIM sampling from Gaussian boxes (``cfg.sampler``); ``draws`` replays the official
        random draws (a hook, batch 1) or is a :class:`DrawSource`; otherwise every draw comes from
        ``generator``."""
        if isinstance(draws, DrawSource):
            source = draws
        elif draws is not None:
            source = OfficialDraws(draws, self.cfg.sampler.box_renewal)
        else:
            source = GeneratorDraws(generator, self.cfg.sampler.sample_steps)
        schedule = self.schedule(images_whwh.device)
        step = functools.partial(self._step_function(), self._runner("head"), features.roi_levels, images_whwh,
                                 schedule=schedule, cfg=self.cfg.sampler, ddim_step=self.impl.ddim_step)
        return ddim_sample(step, images_whwh, self.cfg.num_proposals, schedule, self.cfg.sampler, source,
                           self.impl.ddim_step)

    def _step_function(self) -> Callable[..., tuple[Tensor, ...]]:
        """:func:`~fastdiffinst.modeling.sampler.sampling_step`; compiled, on the fused ops, as one
        ``fullgraph`` graph (the decoder runs inside it uncompiled, so it is traced once, with the
        step)."""
        if not (self.compiled and self.impl is FUSED):
            return sampling_step
        if self._compiled_step is None:
            compiled = torch.compile(sampling_step, fullgraph=True, mode=self.compile_mode)

            def run(head, *args, **kwargs):
                return compiled(getattr(head, "_orig_mod", head), *args, **kwargs)

            self._compiled_step = run
        return self._compiled_step

    def ensemble_steps(self, steps: list[SamplingStep]) -> list[SamplingStep]:
        """The steps whose predictions become candidates: the last one, or with the ensemble every
        step (the official ensemble drops the last step, ShoufaChen/DiffusionDet#56)."""
        sampler = self.cfg.sampler
        if not sampler.use_ensemble or len(steps) == 1:
            return steps[-1:]
        return steps[:-1] if sampler.official_ensemble else steps

    def candidates(self, steps: list[SamplingStep]) -> list[Candidates]:
        """Per image, the top-N (proposal, class) pairs of the last stage of each ensembled step."""
        per_step = []
        for step in self.ensemble_steps(steps):
            head = step.head
            per_step.append(topk_candidates(head.class_logits[-1], head.boxes[-1], head.kernels[-1],
                                            self.cfg.num_proposals))
        return [Candidates.cat([Candidates(*(part[b] for part in step)) for step in per_step])
                for b in range(steps[0].in_boxes.shape[0])]

    def postprocess(self, detections: Candidates, mask_feats: Tensor, image_index: int, image_size: tuple[int, int],
                    output_size: tuple[int, int]) -> dict[str, Tensor]:
        """One image's NMS-kept detections -> its instances at ``output_size`` (docs/official-model.md §5.4)."""
        boxes = scale_and_clip_boxes(detections.boxes.float(), image_size, output_size)
        # Instances whose clipped box is empty are dropped (official ``nonempty``); dropping them
        # before pasting avoids a second full-size copy of the masks.
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        detections, boxes = detections[nonempty], boxes[nonempty]

        def probs_of(start: int, end: int) -> Tensor:
            index = torch.full((end - start,), image_index, dtype=torch.int64, device=mask_feats.device)
            return self.mask_logits(mask_feats, detections.kernels[start:end], index, sigmoid=True)

        # Chunks of instances bound the temporaries.
        chunk = self.impl.mask_chunk_size(tuple(mask_feats.shape[2:]), output_size)
        masks = paste_in_chunks(self.impl.paste_masks, probs_of, boxes, chunk, image_size, output_size)
        return {"boxes": boxes, "scores": detections.scores, "labels": detections.labels, "masks": masks}

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, batch: ImageBatch, output_sizes: Sequence[tuple[int, int]] | None = None,
                generator: torch.Generator | None = None,
                draws: DrawFn | DrawSource | None = None) -> list[dict[str, Tensor]]:
        """Instances of a preprocessed :class:`ImageBatch` (see :meth:`forward`)."""
        if self.training:
            raise RuntimeError("inference needs eval mode (in training mode the mask branch's BatchNorm would use "
                               "and update batch statistics): call model.eval() first")
        output_sizes = self._check_output_sizes(output_sizes, batch.image_sizes)
        features = self.extract_features(batch.tensor)
        steps = self.sample(features, batch.images_whwh, generator=generator, draws=draws)
        return self.instances(steps, features, batch.image_sizes, output_sizes)

    @torch.no_grad()
    def instances(self, steps: list[SamplingStep], features: Features, image_sizes: list[tuple[int, int]],
                  output_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Sampling steps -> per image, the NMS-kept instances at ``output_sizes``
        (docs/official-model.md §5)."""
        results = []
        for b, candidates in enumerate(self.candidates(steps)):
            detections = select_detections(candidates, self.cfg.sampler.nms_iou, self.cfg.sampler.use_nms)
            results.append(self.postprocess(detections, features.mask_feats, b, image_sizes[b], output_sizes[b]))
        return results

    @staticmethod
    def _check_output_sizes(output_sizes: Sequence[tuple[int, int]] | None,
                            image_sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if output_sizes is None:
            return list(image_sizes)
        if len(output_sizes) != len(image_sizes):
            raise ValueError(f"output_sizes must have one (H, W) per image ({len(image_sizes)}), "
                             f"got {len(output_sizes)}")
        checked = []
        for i, size in enumerate(output_sizes):
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
                raise ValueError(f"output_sizes[{i}] must be (H, W) with two positive ints, got {size!r}")
            checked.append((size[0], size[1]))
        return checked

    def losses(self, images: Sequence[Tensor] | Tensor, targets: Sequence[Mapping[str, Tensor]],
               generator: torch.Generator | None = None, draws: DrawFn | None = None) -> dict[str, Tensor]:
        """The training losses of a batch (docs/official-model.md §4; see :mod:`fastdiffinst.modeling.losses`).

        Args:
            images: as :meth:`preprocess`.
            targets: per image ``{"boxes": [G, 4] xyxy pixels, "labels": [G] int64, "masks": [G, h, w]}``
                (see :mod:`fastdiffinst.modeling.targets`).
            generator: source of the box corruption's (and the federated loss's) random draws.
            draws: the official-order draw hook, for replaying the official code.

        Raises ``FloatingPointError`` naming the terms that are not finite (on the fused path,
        non-finite predicted boxes stop earlier, in the next stage's RoIAlign: "rois must be finite").
        """
        losses = self.training_outputs(images, targets, generator, draws).losses
        values = torch.stack([v.detach() for v in losses.values()])
        if not bool(torch.isfinite(values).all()):
            bad = {name: float(v.detach()) for name, v in losses.items() if not bool(torch.isfinite(v))}
            raise FloatingPointError(f"non-finite training losses: {bad}")
        return losses

    def training_outputs(self, images: Sequence[Tensor] | Tensor, targets: Sequence[Mapping[str, Tensor]],
                         generator: torch.Generator | None = None, draws: DrawFn | None = None) -> TrainingOutputs:
        """The training forward with its intermediates (see :meth:`losses`); in bf16 or fp16 under
        ``torch.autocast`` (mixed precision on the fp32 weights)."""
        batch = self.preprocess(images, self.cfg.input.square_pad)
        prepared = prepare_targets(targets, batch.image_sizes, tuple(batch.tensor.shape[2:]), self.cfg.num_classes,
                                   self.device, batch.tensor.dtype)
        boxes, t = noisy_proposals(prepared, batch.images_whwh, self.cfg.num_proposals,
                                   self.schedule(batch.tensor.device), self.cfg.sampler.snr_scale,
                                   self.impl.training_boxes,
                                   generator=generator, draws=draws)
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.precision != "fp32"):
            features = self.extract_features(batch.tensor)
            head = self.run_head(features, boxes, t)
            losses, matches = self.criterion(head.class_logits, head.boxes, head.kernels, features.mask_feats,
                                             prepared, self.impl.dice_sums, self._class_sampler(generator, draws))
        return TrainingOutputs(batch, prepared, boxes, t, features, head, losses, matches)

    @staticmethod
    def _class_sampler(generator: torch.Generator | None, draws: DrawFn | None):
        """The federated loss's sampling of negative classes, from the hook or the generator."""
        def sample(prob: Tensor, count: int) -> Tensor:
            if draws is not None:
                return draws((count,), torch.int64, prob.device).to(prob.device)
            source = generator.device if generator is not None else torch.device("cpu")
            return torch.multinomial(prob.to(source), count, replacement=False, generator=generator).to(prob.device)

        return sample

    def forward(self, images: Sequence[Tensor] | Tensor, targets: Sequence[Mapping[str, Tensor]] | None = None,
                output_sizes: Sequence[tuple[int, int]] | None = None, generator: torch.Generator | None = None,
                draws: DrawFn | DrawSource | None = None) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        """In training mode, the loss dict of ``images`` and ``targets`` (:meth:`losses`); in eval
        mode, instance segmentation of ``images`` (see :meth:`preprocess`).

        Args:
            output_sizes: per image, the (H, W) to report results at (e.g. the original size
                before a test-time resize); default the input size.
            generator: source of the random draws.
            draws: the official-order draw hook ``(shape, dtype, device) -> Tensor`` (batch 1 at
                inference), for replaying the official code, or (inference) a :class:`DrawSource`.
        """
        if self.training:
            if targets is None:
                raise ValueError("in training mode DiffusionInst needs targets (it returns the losses); call "
                                 "model.eval() for inference")
            return self.losses(images, targets, generator, draws)
        if targets is not None:
            raise ValueError("targets were given in eval mode: call model.train() for the losses")
        return self.predict(self.preprocess(images), output_sizes, generator, draws)

    def num_parameters(self, trainable: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable)


__all__ = ["DiffusionInst", "Features", "ImageBatch", "TrainingOutputs", "build_bottom_up"]
