"""Dataclass configs of DiffusionInst and the named presets (docs/design.md §4; the official model:
docs/official-model.md §1 and §6).

Every size the model uses comes from here. ``get_config(name)`` returns a fresh copy of a preset;
``replace_path(cfg, "head.num_stages", 3)`` (or ``override(cfg, ["head.num_stages=3"])``) changes
one field. The official configs map as follows (docs/official-model.md §6):

==================  ===============================================================
preset              official config
==================  ===============================================================
``r50_coco``        ``diffinst.coco.res50.inst.yaml`` (batch 32, lr 5e-5, 90k iterations)
``r50_coco_450k``   ``diffinst.coco.res50.yaml`` (batch 2, lr 1.25e-5, 450k iterations)
``r101_coco``       ``diffinst.coco.res101.yaml``
``swinb_coco``      ``diffinst.coco.swinbase.yaml``
``r50_lvis``        ``diffinst.lvis.res50.yaml`` (1203 classes, federated loss)
``official_small``  the reduced configuration of the golden fixture (tests/data/README.md)
``tiny``            ResNet-18 with reduced widths, trains on 2 CPU cores in minutes
==================  ===============================================================
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastdiffinst.common.diffusion import NUM_TIMESTEPS
from fastdiffinst.ops._checks import SAMPLING_RATIO_RULE, valid_sampling_ratio
from fastdiffinst.ops.dynamic_mask_head import MAX_CHANNELS as MAX_MASK_HEAD_CHANNELS
from fastdiffinst.ops.dynamic_mask_head import MAX_LAYERS as MAX_MASK_HEAD_LAYERS

# torchvision's ImageNet statistics on the 0-255 scale, RGB (docs/official-model.md §1.1).
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)


class _FieldChecks:
    """Checks of one config section's fields; a failure raises ``ValueError`` naming the key path
    (``config: solver.base_lr must be > 0, got -1.0``)."""

    def __init__(self, section: object, path: str) -> None:
        self.section, self.path = section, path

    def fail(self, name: str, requirement: str) -> None:
        where = f"{self.path}.{name}" if self.path else name
        raise ValueError(f"config: {where} must be {requirement}, got {getattr(self.section, name)!r}")

    def integer(self, name: str, low: int = 1, high: int | None = None) -> None:
        """An int (not a bool) in [low, high]."""
        requirement = integer_requirement(getattr(self.section, name), low, high)
        if requirement is not None:
            self.fail(name, requirement)

    def positive_ints(self, *names: str) -> None:
        for name in names:
            self.integer(name)

    def number(self, name: str, low: float, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = False) -> None:
        """A finite real in the interval from ``low`` to ``high`` (closed unless ``*_open``)."""
        requirement = number_requirement(getattr(self.section, name), low, high, low_open=low_open,
                                         high_open=high_open)
        if requirement is not None:
            self.fail(name, requirement)

    def one_of(self, name: str, choices: Sequence[Any]) -> None:
        if getattr(self.section, name) not in choices:
            self.fail(name, " or ".join(map(repr, choices)) if len(choices) == 2 else f"one of {list(choices)}")

    def boolean(self, *names: str) -> None:
        for name in names:
            if not isinstance(getattr(self.section, name), bool):
                self.fail(name, "a bool")

    def positive_int_sequence(self, name: str, length: int | None = None, *, sorted_: bool = False) -> None:
        """A non-empty tuple or list of positive ints (of ``length`` entries; with ``sorted_``,
        non-decreasing)."""
        values = getattr(self.section, name)
        valid = (isinstance(values, (tuple, list)) and len(values) > 0 and all(_is_int(v) and v >= 1 for v in values)
                 and (length is None or len(values) == length)
                 and (not sorted_ or all(a <= b for a, b in zip(values, values[1:]))))
        if not valid:
            count = "a non-empty tuple of" if length is None else f"a tuple of {length}"
            order = ", non-decreasing" if sorted_ else ""
            self.fail(name, f"{count} positive ints{order}")

    def finite_sequence(self, name: str, length: int, *, positive: bool = False) -> None:
        values = getattr(self.section, name)
        if not (isinstance(values, (tuple, list)) and len(values) == length
                and all(_is_real(v) and math.isfinite(v) and (not positive or v > 0) for v in values)):
            self.fail(name, f"a tuple of {length} finite{' positive' if positive else ''} numbers")


def integer_requirement(value: Any, low: int = 1, high: int | None = None) -> str | None:
    """None when ``value`` is an int (not a bool) in [low, high], else what it must be (``"a positive
    int"``): the rule of every integer field, and of the command line's integer flags."""
    if _is_int(value) and value >= low and (high is None or value <= high):
        return None
    if high is not None:
        return f"an int in [{low}, {high}]"
    return "a positive int" if low == 1 else f"an int >= {low}"


def number_requirement(value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
                       high_open: bool = False) -> str | None:
    """None when ``value`` is a finite real in the interval from ``low`` to ``high`` (closed unless
    ``*_open``), else what it must be: the rule of every real field and real command-line flag."""
    if not _is_real(value) or not math.isfinite(value):
        return "a finite number"
    if (low < value if low_open else low <= value) and (value < high if high_open else value <= high):
        return None
    if high == math.inf:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ResNetConfig:
    """detectron2 ``RESNETS.*``: bottleneck widths are ``num_groups * width_per_group`` at res2,
    doubling per stage; the stage outputs start at ``res2_out_channels`` and double."""

    depth: int = 50
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    num_groups: int = 1
    width_per_group: int = 64
    freeze_at: int = 2  # 0 = nothing frozen, 1 = the stem, 2 = stem and res2, ...
    norm: str = "FrozenBN"  # or "GN" (GroupNorm), for training from scratch

    def validate(self) -> ResNetConfig:
        """A depth of :data:`RESNET_BLOCKS`, positive widths, ``freeze_at`` in [0, 5], a known norm,
        and no grouped convolutions in the basic blocks of ResNet-18/34."""
        checks = _FieldChecks(self, "backbone.resnet")
        checks.one_of("depth", sorted(RESNET_BLOCKS))
        checks.positive_ints("stem_out_channels", "res2_out_channels", "num_groups", "width_per_group")
        checks.integer("freeze_at", 0, 5)
        checks.one_of("norm", ("FrozenBN", "GN"))
        if self.depth < 50 and self.num_groups != 1:
            checks.fail("num_groups", f"1 for ResNet-{self.depth} (basic blocks have no grouped conv)")
        return self


@dataclass
class SwinConfig:
    """The official Swin backbone (``SWIN.SIZE: B-22k``)."""

    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3

    def validate(self) -> SwinConfig:
        """Four stages (the FPN reads res2..res5), each stage's width ``embed_dim·2^i`` divisible by
        its number of heads, positive sizes, ``drop_path_rate`` in [0, 1)."""
        checks = _FieldChecks(self, "backbone.swin")
        checks.positive_ints("embed_dim", "window_size")
        checks.positive_int_sequence("depths", 4)
        checks.positive_int_sequence("num_heads", 4)
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim << i) % heads:
                checks.fail("num_heads", f"divisors of the stage widths embed_dim·2^i = "
                                         f"{[self.embed_dim << j for j in range(4)]}")
        checks.number("mlp_ratio", 0, low_open=True)
        checks.number("drop_path_rate", 0, 1, high_open=True)
        return self


@dataclass
class BackboneConfig:
    name: str = "resnet"  # "resnet" or "swin"
    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    swin: SwinConfig = field(default_factory=SwinConfig)
    fpn_channels: int = 256  # FPN.OUT_CHANNELS; must equal head.hidden_dim

    def validate(self) -> BackboneConfig:
        """The name, the FPN width and the section of the backbone in use (``resnet`` or ``swin``)."""
        checks = _FieldChecks(self, "backbone")
        checks.one_of("name", ("resnet", "swin"))
        checks.positive_ints("fpn_channels")
        getattr(self, self.name).validate()
        return self


@dataclass
class HeadConfig:
    """DiffusionDet's ``DynamicHead`` plus DiffusionInst's mask branch and controller."""

    hidden_dim: int = 256
    num_attention_heads: int = 8  # NHEADS
    dim_feedforward: int = 2048
    dropout: float = 0.0
    activation: str = "relu"
    num_stages: int = 6  # NUM_HEADS in the official config (the number of decoder stages)
    num_cls: int = 1
    num_reg: int = 3
    dim_dynamic: int = 64
    num_dynamic: int = 2
    pooler_resolution: int = 7
    pooler_sampling_ratio: int = 2
    prior_prob: float = 0.01
    # Mask branch (fixed in the official code): P2-P4 refined to 128 channels, a tower of 4 convs,
    # 8 output channels at stride 4.
    mask_branch_channels: int = 128
    mask_tower_convs: int = 4
    mask_feat_channels: int = 8
    # The dynamic mask head (8 -> 8 -> 8 -> 1, no relative coordinates: 153 filter values).
    mask_head_channels: int = 8
    mask_head_layers: int = 3

    def validate(self) -> HeadConfig:
        """Positive sizes (tower depths >= 0), attention heads dividing the width, the two DynamicConv
        layers, a known activation, a dropout in [0, 1), the RoIAlign ops' sampling ratio rule, the
        fused mask head's limits and a prior probability in (0, 1)."""
        checks = _FieldChecks(self, "head")
        checks.positive_ints("hidden_dim", "num_attention_heads", "dim_feedforward", "num_stages", "dim_dynamic",
                             "num_dynamic", "pooler_resolution", "mask_branch_channels", "mask_feat_channels",
                             "mask_head_channels", "mask_head_layers")
        if self.hidden_dim % self.num_attention_heads:
            raise ValueError(f"config: head.hidden_dim ({self.hidden_dim}) must be divisible by "
                             f"head.num_attention_heads ({self.num_attention_heads})")
        if self.num_dynamic != 2:
            checks.fail("num_dynamic", "2 (DynamicConv uses two generated layers)")
        checks.one_of("activation", ("relu", "gelu"))
        for name in ("num_cls", "num_reg", "mask_tower_convs"):
            checks.integer(name, 0)
        # The RoIAlign ops' rule: <= 0 is the adaptive grid, ceil(roi size / output size) samples per bin.
        if not valid_sampling_ratio(self.pooler_sampling_ratio):
            checks.fail("pooler_sampling_ratio", f"an int {SAMPLING_RATIO_RULE}")
        checks.number("dropout", 0, 1, high_open=True)
        if self.mask_head_channels > MAX_MASK_HEAD_CHANNELS:
            checks.fail("mask_head_channels", f"in [1, {MAX_MASK_HEAD_CHANNELS}] (the fused mask head's limit)")
        if self.mask_head_layers > MAX_MASK_HEAD_LAYERS:
            checks.fail("mask_head_layers", f"in [1, {MAX_MASK_HEAD_LAYERS}]")
        checks.number("prior_prob", 0, 1, low_open=True, high_open=True)
        return self


@dataclass
class SamplerConfig:
    """DDIM sampling and inference (docs/official-model.md §3.4, §5)."""

    sample_steps: int = 1
    eta: float = 1.0
    snr_scale: float = 2.0
    box_renewal: bool = True
    renewal_threshold: float = 0.5
    use_ensemble: bool = True
    # True reproduces the official ensemble, which never adds the final step's predictions
    # (ShoufaChen/DiffusionDet#56); False includes every step.
    official_ensemble: bool = False
    use_nms: bool = True
    nms_iou: float = 0.5

    def validate(self) -> SamplerConfig:
        """1 to ``NUM_TIMESTEPS`` DDIM steps; ``eta``, ``renewal_threshold`` and ``nms_iou`` in [0, 1]."""
        checks = _FieldChecks(self, "sampler")
        checks.positive_ints("sample_steps")
        if self.sample_steps > NUM_TIMESTEPS:
            checks.fail("sample_steps", f"at most {NUM_TIMESTEPS}")
        # eta in [0, 1] keeps 1 - ᾱ_next - σ² >= 0 at every DDIM step.
        for name in ("eta", "renewal_threshold", "nms_iou"):
            checks.number(name, 0, 1)
        checks.number("snr_scale", 0, low_open=True)
        checks.boolean("box_renewal", "use_ensemble", "official_ensemble", "use_nms")
        return self


@dataclass
class LossConfig:
    """Matcher and loss weights (docs/official-model.md §4)."""

    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    mask_weight: float = 5.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    ota_k: int = 5
    center_radius: float = 2.5
    use_fed_loss: bool = False
    fed_loss_num_classes: int = 50
    fed_loss_freq_weight_power: float = 0.5

    def validate(self) -> LossConfig:
        """Finite, non-negative weights (0 turns a term off); ``focal_alpha`` in [0, 1], ``focal_gamma``
        >= 0; a positive ``ota_k``, ``center_radius`` and federated-loss class count."""
        checks = _FieldChecks(self, "loss")
        for name in ("class_weight", "l1_weight", "giou_weight", "mask_weight", "focal_gamma",
                     "fed_loss_freq_weight_power"):
            checks.number(name, 0)
        checks.number("focal_alpha", 0, 1)
        checks.positive_ints("ota_k", "fed_loss_num_classes")
        checks.number("center_radius", 0, low_open=True)
        checks.boolean("use_fed_loss")
        return self


LR_SCHEDULES = ("step", "cosine", "linear")


@dataclass
class SolverConfig:
    """Training schedule of the official configs (docs/official-model.md §6); IMS_PER_BATCH is the
    total batch. ``lr_schedule`` shapes the rate after the warm-up: ``"step"`` (the official
    ``WarmupMultiStepLR``: ×0.1 at each of ``steps``), ``"cosine"`` (detectron2's ``WarmupCosineLR``:
    half a cosine from 1 to 0 over ``max_iter``) or ``"linear"`` (from 1 to 0 over ``max_iter``);
    ``steps`` apply to ``"step"`` only."""

    ims_per_batch: int = 32
    base_lr: float = 5e-5
    weight_decay: float = 1e-4
    lr_schedule: str = "step"
    steps: tuple[int, ...] = (60000, 80000)
    max_iter: int = 90000
    warmup_iters: int = 1000
    warmup_factor: float = 0.01
    clip_grad_norm: float = 1.0
    seed: int = 40244023

    def validate(self) -> SolverConfig:
        """Positive batch, iterations, learning rate and clipping norm; ``weight_decay`` >= 0;
        ``steps`` sorted (non-decreasing, as detectron2's milestones; a repeated step decays twice)
        positive iterations, beyond ``max_iter`` never applied, empty for a constant rate;
        ``warmup_iters`` >= 0 with ``warmup_factor`` in [0, 1]; a seed ``torch.Generator.manual_seed``
        accepts, in [-2^63, 2^64)."""
        checks = _FieldChecks(self, "solver")
        checks.positive_ints("ims_per_batch", "max_iter")
        checks.number("base_lr", 0, low_open=True)
        checks.number("weight_decay", 0)
        checks.one_of("lr_schedule", LR_SCHEDULES)
        no_steps = isinstance(self.steps, (tuple, list)) and len(self.steps) == 0
        if not no_steps:  # no step: a constant rate after the warm-up
            checks.positive_int_sequence("steps", sorted_=True)
        checks.integer("warmup_iters", 0)
        checks.number("warmup_factor", 0, 1)
        checks.number("clip_grad_norm", 0, low_open=True)
        checks.integer("seed", -(2**63), 2**64 - 1)
        return self


@dataclass
class InputConfig:
    """Resizing and normalisation (docs/official-model.md §1.1, §5, §6); images are padded to a multiple of the
    backbone's size divisibility (32). Training: flip + a shortest edge from ``min_size_train``
    (longest ≤ ``max_size_train``), or, with probability 0.5 when ``crop`` is on, flip + a shortest
    edge from ``crop_resize`` + a random crop of ``crop_size`` (low, high) px + the same resize.
    ``square_pad`` > 0 pads every training batch to ``square_pad × square_pad`` (rounded up to the
    size divisibility) instead of to its largest image: one input shape for every batch, what
    compiled training needs (``train --compile`` sets it to ``max_size_train`` when it is 0). The
    padding takes part in the mask branch's BatchNorm statistics and in the mask loss (the dice runs
    over the whole padded map), as the usual padding does."""

    min_size_train: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size_train: int = 1333
    crop: bool = True
    crop_resize: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    min_size_test: int = 800
    max_size_test: int = 1333
    square_pad: int = 0
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD

    def validate(self) -> InputConfig:
        """Positive sizes (non-empty choices of shortest edges), a crop range ``(low, high)`` with
        ``low <= high``, and per-channel RGB statistics: finite means, positive deviations."""
        checks = _FieldChecks(self, "input")
        checks.positive_int_sequence("min_size_train")
        checks.positive_int_sequence("crop_resize")
        checks.positive_ints("max_size_train", "min_size_test", "max_size_test")
        checks.integer("square_pad", 0)
        if 0 < self.square_pad < self.max_size_train:
            checks.fail("square_pad", f"0 or at least max_size_train ({self.max_size_train}), so that every "
                                      f"training image fits")
        checks.boolean("crop")
        checks.positive_int_sequence("crop_size", 2)
        if self.crop_size[0] > self.crop_size[1]:
            checks.fail("crop_size", "a range (low, high) with low <= high")
        checks.finite_sequence("pixel_mean", 3)
        checks.finite_sequence("pixel_std", 3, positive=True)
        return self


@dataclass
class ModelConfig:
    num_classes: int = 80
    num_proposals: int = 500
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    input: InputConfig = field(default_factory=InputConfig)

    def validate(self) -> ModelConfig:
        """Raises ``ValueError`` naming the field (its key path) when the configuration cannot build or
        train a model: every section validates itself, then the constraints across sections."""
        _FieldChecks(self, "").positive_ints("num_classes", "num_proposals")
        for section in (self.backbone, self.head, self.sampler, self.loss, self.solver, self.input):
            section.validate()
        if self.backbone.fpn_channels != self.head.hidden_dim:
            raise ValueError(f"config: backbone.fpn_channels ({self.backbone.fpn_channels}) must equal "
                             f"head.hidden_dim ({self.head.hidden_dim}): the head reads FPN channels as d_model")
        return self


# Blocks per stage res2..res5 (detectron2 ``build_resnet_backbone``).
RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _r50_coco() -> ModelConfig:
    return ModelConfig()


def _r50_coco_450k() -> ModelConfig:
    cfg = ModelConfig()
    cfg.solver = SolverConfig(ims_per_batch=2, base_lr=1.25e-5, steps=(350000, 420000), max_iter=450000)
    return cfg


def _r101_coco() -> ModelConfig:
    cfg = ModelConfig()
    cfg.backbone.resnet.depth = 101
    cfg.solver = SolverConfig(steps=(175000, 210000), max_iter=225000)
    return cfg


def _swinb_coco() -> ModelConfig:
    cfg = ModelConfig()
    cfg.backbone.name = "swin"
    cfg.solver = SolverConfig(steps=(175000, 210000), max_iter=225000)
    return cfg


def _r50_lvis() -> ModelConfig:
    cfg = ModelConfig(num_classes=1203)
    cfg.loss.use_fed_loss = True
    cfg.solver = SolverConfig(steps=(105000, 125000), max_iter=135000)
    return cfg


def _official_small() -> ModelConfig:
    """The golden fixture's configuration (tests/data/README.md describes the fixture)."""
    cfg = ModelConfig(num_classes=5, num_proposals=32)
    cfg.backbone = BackboneConfig(resnet=ResNetConfig(depth=50, stem_out_channels=16, res2_out_channels=32,
                                                      num_groups=1, width_per_group=8), fpn_channels=64)
    cfg.head = HeadConfig(hidden_dim=64, num_attention_heads=4, dim_feedforward=128, num_stages=3, dim_dynamic=16)
    return cfg


def _tiny() -> ModelConfig:
    """A ResNet-18 model small enough to train on 2 CPU cores (images <= 256 px)."""
    cfg = ModelConfig(num_classes=8, num_proposals=100)
    cfg.backbone = BackboneConfig(resnet=ResNetConfig(depth=18, stem_out_channels=32, res2_out_channels=32,
                                                      freeze_at=0, norm="GN"), fpn_channels=64)
    # The mask branch at half the FPN width, as the official 128 for 256: its stride-4 convolutions
    # were a third of the convolutions' FLOPs at 64 (docs/training.md).
    cfg.head = HeadConfig(hidden_dim=64, num_attention_heads=4, dim_feedforward=256, num_stages=3, dim_dynamic=16,
                          mask_branch_channels=32, mask_tower_convs=2)
    # No random crops (the official augmentation's other half): without them the model learns more
    # per image at the same time per iteration, segm AP50 +2.7 and +3.8 points after 6 000 images
    # for two seeds (docs/training.md).
    cfg.input = InputConfig(min_size_train=(160, 192, 224, 256), max_size_train=320, crop=False,
                            crop_resize=(160, 192, 224), crop_size=(128, 224), min_size_test=224, max_size_test=320)
    # Tuned on the synthetic set (docs/training.md): 3300 iterations of 4 images, lr x0.1 at 80 %,
    # 20.0 minutes at 11 images/s on 2 cores (2026-12-07's AMD EPYC; train leaves recomputation off
    # on the CPU), then segm AP50 44.8 on the 200 validation images (47.7 and 46.0 with seeds 1 and 2).
    # On a CPU with bf16 instructions, `train --precision bf16 solver.max_iter=3950
    # "solver.steps=(3160,)"` fits 20 minutes (14.5 images/s) and gives segm AP50 55.5 (56.9, seed 1).
    cfg.solver = SolverConfig(ims_per_batch=4, base_lr=4e-4, steps=(2640,), max_iter=3300, warmup_iters=100)
    return cfg


PRESETS = {
    "r50_coco": _r50_coco,
    "r50_coco_450k": _r50_coco_450k,
    "r101_coco": _r101_coco,
    "swinb_coco": _swinb_coco,
    "r50_lvis": _r50_lvis,
    "official_small": _official_small,
    "tiny": _tiny,
}


def get_config(name: str) -> ModelConfig:
    """A fresh copy of the preset ``name`` (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}")
    return PRESETS[name]().validate()


def _field(cfg: ModelConfig, path: str) -> tuple[Any, str]:
    """The dataclass holding the dotted field ``path`` and the field's name; ``ValueError`` if absent."""
    *parents, leaf = path.split(".")
    node: Any = cfg
    for part in parents:
        node = getattr(node, part, None) if dataclasses.is_dataclass(node) else None
    if not dataclasses.is_dataclass(node) or leaf not in {f.name for f in dataclasses.fields(node)}:
        raise ValueError(f"config has no field {path!r}")
    return node, leaf


def replace_path(cfg: ModelConfig, path: str, value: Any) -> ModelConfig:
    """A validated copy of ``cfg`` with the dotted field ``path`` (e.g. ``"sampler.sample_steps"``) set."""
    cfg = copy.deepcopy(cfg)
    node, leaf = _field(cfg, path)
    setattr(node, leaf, value)
    return cfg.validate()


def _parse(text: str, current: Any, annotation: Any = None) -> Any:
    """``text`` as a value of the type of ``current``; a tuple's entries take the element type of
    the field's ``annotation`` (``tuple[int, ...]``: ints, even when ``current`` is empty)."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        return _convert(int, text)
    if isinstance(current, float):
        return _convert(float, text)
    if isinstance(current, tuple):
        declared = typing.get_args(annotation)
        kind = declared[0] if declared else type(current[0]) if current else float
        return tuple(_convert(kind, v) for v in text.strip("()[] ").split(",") if v.strip())
    return text


def _convert(kind: type, text: str) -> Any:
    """``kind(text)`` for int, float (or str), with an error that says what was expected."""
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(f"expected {'an int' if kind is int else 'a number'}, got {text.strip()!r}") from None


def override(cfg: ModelConfig, assignments: list[str]) -> ModelConfig:
    """``cfg`` with ``"a.b=value"`` assignments applied, each value parsed as the field's type."""
    for assignment in assignments:
        if "=" not in assignment:
            raise ValueError(f"config override must be 'field.path=value', got {assignment!r}")
        path, text = assignment.split("=", 1)
        node, leaf = _field(cfg, path)
        try:
            value = _parse(text, getattr(node, leaf), typing.get_type_hints(type(node))[leaf])
        except ValueError as error:
            raise ValueError(f"config override {path}: {error}") from None
        cfg = replace_path(cfg, path, value)
    return cfg


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A plain (json- and pickle-safe) dict of ``cfg``."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """The inverse of :func:`config_to_dict`; unknown fields raise ``ValueError``."""
    def build(kind: type, values: dict[str, Any], where: str) -> Any:
        if not isinstance(values, dict):
            raise ValueError(f"config {where or 'root'} must be a mapping, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(kind)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"config {where or 'root'} has unknown fields {unknown}")
        kwargs = {}
        for name, value in values.items():
            default = getattr(kind(), name)
            if dataclasses.is_dataclass(default):
                kwargs[name] = build(type(default), value, f"{where}.{name}".lstrip("."))
            else:
                kwargs[name] = tuple(value) if isinstance(default, tuple) else value
        return kind(**kwargs)

    return build(ModelConfig, data, "").validate()
