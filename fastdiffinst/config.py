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
from dataclasses import dataclass, field
from typing import Any

from fastdiffinst.common.diffusion import NUM_TIMESTEPS
from fastdiffinst.ops.dynamic_mask_head import MAX_CHANNELS as MAX_MASK_HEAD_CHANNELS
from fastdiffinst.ops.dynamic_mask_head import MAX_LAYERS as MAX_MASK_HEAD_LAYERS

# torchvision's ImageNet statistics on the 0-255 scale, RGB (docs/official-model.md §1.1).
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)


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


@dataclass
class SwinConfig:
    """The official Swin backbone (``SWIN.SIZE: B-22k``)."""

    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3


@dataclass
class BackboneConfig:
    name: str = "resnet"  # "resnet" or "swin"
    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    swin: SwinConfig = field(default_factory=SwinConfig)
    fpn_channels: int = 256  # FPN.OUT_CHANNELS; must equal head.hidden_dim


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


@dataclass
class SolverConfig:
    """Training schedule of the official configs (docs/official-model.md §6); IMS_PER_BATCH is the
    total batch."""

    ims_per_batch: int = 32
    base_lr: float = 5e-5
    weight_decay: float = 1e-4
    steps: tuple[int, ...] = (60000, 80000)
    max_iter: int = 90000
    warmup_iters: int = 1000
    warmup_factor: float = 0.01
    clip_grad_norm: float = 1.0
    seed: int = 40244023


@dataclass
class InputConfig:
    """Resizing and normalisation (docs/official-model.md §1.1, §5, §6); images are padded to a multiple of the
    backbone's size divisibility (32). Training: flip + a shortest edge from ``min_size_train``
    (longest ≤ ``max_size_train``), or, with probability 0.5 when ``crop`` is on, flip + a shortest
    edge from ``crop_resize`` + a random crop of ``crop_size`` (low, high) px + the same resize."""

    min_size_train: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size_train: int = 1333
    crop: bool = True
    crop_resize: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    min_size_test: int = 800
    max_size_test: int = 1333
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD


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
        """Raises ``ValueError`` naming the field when the configuration cannot build a model."""
        def positive(name: str, value: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config: {name} must be a positive int, got {value!r}")

        positive("num_classes", self.num_classes)
        positive("num_proposals", self.num_proposals)
        if self.backbone.name not in ("resnet", "swin"):
            raise ValueError(f"config: backbone.name must be 'resnet' or 'swin', got {self.backbone.name!r}")
        if self.backbone.name == "resnet" and self.backbone.resnet.depth not in RESNET_BLOCKS:
            raise ValueError(f"config: backbone.resnet.depth must be one of {sorted(RESNET_BLOCKS)}, "
                             f"got {self.backbone.resnet.depth}")
        resnet = self.backbone.resnet
        if resnet.norm not in ("FrozenBN", "GN"):
            raise ValueError(f"config: backbone.resnet.norm must be 'FrozenBN' or 'GN', got {resnet.norm!r}")
        if self.backbone.name == "resnet" and resnet.depth < 50 and resnet.num_groups != 1:
            raise ValueError(f"config: backbone.resnet.num_groups must be 1 for ResNet-{resnet.depth} "
                             f"(basic blocks have no grouped conv), got {resnet.num_groups}")
        head = self.head
        for name in ("hidden_dim", "num_attention_heads", "dim_feedforward", "num_stages", "dim_dynamic",
                     "num_dynamic", "pooler_resolution", "mask_branch_channels", "mask_feat_channels",
                     "mask_head_channels", "mask_head_layers"):
            positive(f"head.{name}", getattr(head, name))
        if self.backbone.fpn_channels != head.hidden_dim:
            raise ValueError(f"config: backbone.fpn_channels ({self.backbone.fpn_channels}) must equal "
                             f"head.hidden_dim ({head.hidden_dim}): the head reads FPN channels as d_model")
        if head.hidden_dim % head.num_attention_heads:
            raise ValueError(f"config: head.hidden_dim ({head.hidden_dim}) must be divisible by "
                             f"head.num_attention_heads ({head.num_attention_heads})")
        if head.num_dynamic != 2:
            raise ValueError(f"config: head.num_dynamic must be 2 (DynamicConv uses two generated layers), "
                             f"got {head.num_dynamic}")
        if head.activation not in ("relu", "gelu"):
            raise ValueError(f"config: head.activation must be 'relu' or 'gelu', got {head.activation!r}")
        if not 1 <= head.mask_head_channels <= MAX_MASK_HEAD_CHANNELS:
            raise ValueError(f"config: head.mask_head_channels must be in [1, {MAX_MASK_HEAD_CHANNELS}] (the fused "
                             f"mask head's limit), got {head.mask_head_channels}")
        if not 1 <= head.mask_head_layers <= MAX_MASK_HEAD_LAYERS:
            raise ValueError(f"config: head.mask_head_layers must be in [1, {MAX_MASK_HEAD_LAYERS}], "
                             f"got {head.mask_head_layers}")
        sampler = self.sampler
        positive("sampler.sample_steps", sampler.sample_steps)
        if sampler.sample_steps > NUM_TIMESTEPS:
            raise ValueError(f"config: sampler.sample_steps must be at most {NUM_TIMESTEPS}, "
                             f"got {sampler.sample_steps}")
        # eta in [0, 1] keeps 1 - ᾱ_next - σ² >= 0 at every DDIM step.
        for name, low, high in (("eta", 0.0, 1.0), ("renewal_threshold", 0.0, 1.0), ("nms_iou", 0.0, 1.0)):
            value = getattr(sampler, name)
            if not (isinstance(value, (int, float)) and low <= value <= high):
                raise ValueError(f"config: sampler.{name} must be in [{low}, {high}], got {value!r}")
        if not 0 < head.prior_prob < 1:
            raise ValueError(f"config: head.prior_prob must be in (0, 1), got {head.prior_prob}")
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
    cfg.head = HeadConfig(hidden_dim=64, num_attention_heads=4, dim_feedforward=256, num_stages=3, dim_dynamic=16,
                          mask_branch_channels=64, mask_tower_convs=2)
    cfg.input = InputConfig(min_size_train=(160, 192, 224, 256), max_size_train=320, crop_resize=(160, 192, 224),
                            crop_size=(128, 224), min_size_test=224, max_size_test=320)
    # Tuned on the synthetic set: 3000 iterations of 4 images take about 18 minutes on 2 CPU cores.
    cfg.solver = SolverConfig(ims_per_batch=4, base_lr=4e-4, steps=(2400,), max_iter=3000, warmup_iters=100)
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


def _parse(text: str, current: Any) -> Any:
    """``text`` as a value of the type of ``current``."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple):
        kind = type(current[0]) if current else float
        return tuple(kind(v) for v in text.strip("()[] ").split(",") if v.strip())
    return text


def override(cfg: ModelConfig, assignments: list[str]) -> ModelConfig:
    """``cfg`` with ``"a.b=value"`` assignments applied, each value parsed as the field's type."""
    for assignment in assignments:
        if "=" not in assignment:
            raise ValueError(f"config override must be 'field.path=value', got {assignment!r}")
        path, text = assignment.split("=", 1)
        node, leaf = _field(cfg, path)
        try:
            value = _parse(text, getattr(node, leaf))
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
