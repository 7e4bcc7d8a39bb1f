"""Configuration checks: every section validates itself and names the offending key path; the
model's validation runs every section and the constraints across sections."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fastdiffinst.config import (
    PRESETS,
    BackboneConfig,
    HeadConfig,
    InputConfig,
    LossConfig,
    ModelConfig,
    ResNetConfig,
    SamplerConfig,
    SolverConfig,
    SwinConfig,
    config_from_dict,
    config_to_dict,
    get_config,
    override,
    replace_path,
)

SECTIONS = [ResNetConfig, SwinConfig, BackboneConfig, HeadConfig, SamplerConfig, LossConfig, SolverConfig, InputConfig]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_and_its_sections_validate(name):
    cfg = get_config(name)
    for section in (cfg.backbone, cfg.head, cfg.sampler, cfg.loss, cfg.solver, cfg.input):
        assert section.validate() is section


@pytest.mark.parametrize("kind", SECTIONS, ids=lambda kind: kind.__name__)
def test_default_sections_validate(kind):
    section = kind()
    assert section.validate() is section


# (key path, bad value, the requirement the message states)
BAD_VALUES = [
    ("solver.ims_per_batch", 0, "must be a positive int"),
    ("solver.ims_per_batch", 2.0, "must be a positive int"),
    ("solver.max_iter", -5, "must be a positive int"),
    ("solver.base_lr", -1.0, "must be > 0"),
    ("solver.base_lr", 0.0, "must be > 0"),
    ("solver.base_lr", math.nan, "must be a finite number"),
    ("solver.base_lr", "0.1", "must be a finite number"),
    ("solver.weight_decay", -1e-4, "must be >= 0"),
    ("solver.lr_schedule", "exponential", "must be one of ['step', 'cosine', 'linear']"),
    ("solver.steps", (80, 60), "must be a non-empty tuple of positive ints, non-decreasing"),
    ("solver.steps", (0, 60), "must be a non-empty tuple of positive ints, non-decreasing"),
    ("solver.steps", (60.0,), "must be a non-empty tuple of positive ints, non-decreasing"),
    ("solver.steps", 60, "must be a non-empty tuple of positive ints, non-decreasing"),
    ("solver.warmup_iters", -1, "must be an int >= 0"),
    ("solver.warmup_factor", 1.5, "must be in [0, 1]"),
    ("solver.clip_grad_norm", 0.0, "must be > 0"),
    ("solver.clip_grad_norm", math.inf, "must be a finite number"),
    ("solver.seed", -(2**63) - 1, "must be an int in [-9223372036854775808, 18446744073709551615]"),
    ("solver.seed", 2**64, "must be an int in [-9223372036854775808, 18446744073709551615]"),
    ("solver.seed", 1.0, "must be an int in [-9223372036854775808, 18446744073709551615]"),
    ("loss.class_weight", -2.0, "must be >= 0"),
    ("loss.mask_weight", math.inf, "must be a finite number"),
    ("loss.giou_weight", math.nan, "must be a finite number"),
    ("loss.focal_alpha", 1.5, "must be in [0, 1]"),
    ("loss.focal_gamma", -1.0, "must be >= 0"),
    ("loss.ota_k", 0, "must be a positive int"),
    ("loss.center_radius", 0.0, "must be > 0"),
    ("loss.use_fed_loss", 1, "must be a bool"),
    ("loss.fed_loss_num_classes", 0, "must be a positive int"),
    ("loss.fed_loss_freq_weight_power", -0.5, "must be >= 0"),
    ("input.min_size_train", (), "must be a non-empty tuple of positive ints"),
    ("input.min_size_train", (480, 0), "must be a non-empty tuple of positive ints"),
    ("input.max_size_train", 0, "must be a positive int"),
    ("input.square_pad", -32, "must be an int >= 0"),
    ("input.crop", "yes", "must be a bool"),
    ("input.crop_resize", (400, -1), "must be a non-empty tuple of positive ints"),
    ("input.crop_size", (384,), "must be a tuple of 2 positive ints"),
    ("input.crop_size", (600, 384), "must be a range (low, high) with low <= high"),
    ("input.min_size_test", 0, "must be a positive int"),
    ("input.max_size_test", -1, "must be a positive int"),
    ("input.pixel_mean", (1.0, 2.0), "must be a tuple of 3 finite numbers"),
    ("input.pixel_mean", (1.0, math.nan, 2.0), "must be a tuple of 3 finite numbers"),
    ("input.pixel_std", (58.4, 0.0, 57.4), "must be a tuple of 3 finite positive numbers"),
    ("backbone.resnet.freeze_at", 6, "must be an int in [0, 5]"),
    ("backbone.resnet.width_per_group", 0, "must be a positive int"),
    ("backbone.resnet.depth", 7, "must be one of [18, 34, 50, 101, 152]"),
    ("head.dropout", 1.0, "must be in [0, 1)"),
    ("head.num_reg", -1, "must be an int >= 0"),
    ("head.pooler_sampling_ratio", 2000, "must be an int at most 1024 (<= 0 for the adaptive grid)"),
    ("head.pooler_sampling_ratio", 2.0, "must be an int at most 1024 (<= 0 for the adaptive grid)"),
    ("sampler.snr_scale", 0.0, "must be > 0"),
    ("sampler.use_nms", None, "must be a bool"),
    ("sampler.renewal_threshold", 1.5, "must be in [0, 1]"),
]


@pytest.mark.parametrize("path, value, requirement", BAD_VALUES, ids=[f"{p}={v!r}" for p, v, _ in BAD_VALUES])
def test_bad_values_name_their_key_path(path, value, requirement):
    message = f"config: {path} {requirement}, got {value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        replace_path(get_config("tiny"), path, value)


def test_square_pad_holds_every_training_image():
    with pytest.raises(ValueError, match=re.escape("input.square_pad must be 0 or at least max_size_train (320)")):
        replace_path(get_config("tiny"), "input.square_pad", 300)
    assert replace_path(get_config("tiny"), "input.square_pad", 320).input.square_pad == 320


STANDALONE = {"solver": SolverConfig, "loss": LossConfig, "input": InputConfig}
STANDALONE_BAD = [bad for bad in BAD_VALUES if bad[0].split(".")[0] in STANDALONE]


@pytest.mark.parametrize("path, value, requirement", STANDALONE_BAD, ids=[f"{p}={v!r}" for p, v, _ in STANDALONE_BAD])
def test_a_section_validates_on_its_own(path, value, requirement):
    section_name, field_name = path.split(".")
    section = STANDALONE[section_name]()
    setattr(section, field_name, value)
    with pytest.raises(ValueError, match=re.escape(f"config: {path} {requirement}")):
        section.validate()


@pytest.mark.parametrize("path, value", [
    ("solver.steps", ()),  # a constant rate after the warm-up
    ("solver.steps", []),
    ("solver.steps", (10**9,)),  # a step beyond max_iter never applies
    ("solver.steps", (60, 60)),  # sorted, as detectron2's milestones: a repeated step decays twice
    ("solver.warmup_iters", 0),
    ("solver.warmup_factor", 0.0),
    ("solver.weight_decay", 0.0),
    ("solver.seed", 0),
    ("solver.seed", -(2**63)),  # the range of torch.Generator.manual_seed
    ("solver.seed", 2**64 - 1),
    ("head.pooler_sampling_ratio", 0),  # <= 0: the adaptive grid, as the RoIAlign ops
    ("head.pooler_sampling_ratio", -1),
    ("head.pooler_sampling_ratio", 1024),  # MAX_SAMPLING_RATIO
    ("loss.mask_weight", 0.0),  # a weight of 0 turns a term off
    ("loss.focal_gamma", 0.0),
    ("input.crop_size", (224, 224)),
    ("head.num_reg", 0),
    ("sampler.eta", 0),
])
def test_boundary_values_are_accepted(path, value):
    cfg = replace_path(get_config("tiny"), path, value)
    section, name = path.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_swin_section_is_checked_when_it_is_the_backbone():
    swin = replace_path(get_config("tiny"), "backbone.name", "swin")
    with pytest.raises(ValueError, match=re.escape("config: backbone.swin.num_heads must be divisors of the stage "
                                                   "widths embed_dim·2^i = [128, 256, 512, 1024], got (4, 8, 16, 3)")):
        replace_path(swin, "backbone.swin.num_heads", (4, 8, 16, 3))
    with pytest.raises(ValueError, match=re.escape("config: backbone.swin.depths must be a tuple of 4 positive ints")):
        replace_path(swin, "backbone.swin.depths", (2, 2, 2))
    with pytest.raises(ValueError, match=re.escape("config: backbone.swin.drop_path_rate must be in [0, 1)")):
        replace_path(swin, "backbone.swin.drop_path_rate", 1.0)
    # The ResNet is the backbone: the unused Swin section is not a reason to reject the model.
    resnet = replace_path(get_config("tiny"), "backbone.swin.num_heads", (4, 8, 16, 3))
    assert resnet.backbone.name == "resnet"


def test_model_validation_runs_every_section_and_the_cross_section_rule():
    cfg = ModelConfig()
    cfg.solver.base_lr = -1.0
    with pytest.raises(ValueError, match=re.escape("config: solver.base_lr must be > 0, got -1.0")):
        cfg.validate()
    cfg = ModelConfig()
    cfg.input.pixel_std = (1.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="config: input.pixel_std"):
        cfg.validate()
    cfg = ModelConfig()
    cfg.backbone.fpn_channels = 128  # each section is valid on its own
    cfg.backbone.validate()
    cfg.head.validate()
    with pytest.raises(ValueError, match=re.escape("backbone.fpn_channels (128) must equal head.hidden_dim (256)")):
        cfg.validate()


def test_a_saved_configuration_is_validated_when_read_back():
    data = config_to_dict(get_config("tiny"))
    assert config_from_dict(data) == get_config("tiny")
    data["loss"]["focal_alpha"] = 2.0
    with pytest.raises(ValueError, match=re.escape("config: loss.focal_alpha must be in [0, 1], got 2.0")):
        config_from_dict(data)


@pytest.mark.parametrize("assignment, path, expected", [
    ("solver.steps=(100,)", "solver.steps", (100,)),  # from the empty default of a preset: ints, not floats
    ("solver.steps=100,200", "solver.steps", (100, 200)),
    ("solver.steps=()", "solver.steps", ()),
    ("solver.seed=-5", "solver.seed", -5),
    ("head.pooler_sampling_ratio=-1", "head.pooler_sampling_ratio", -1),
    ("input.pixel_mean=1,2,3", "input.pixel_mean", (1.0, 2.0, 3.0)),
    ("input.crop_size=(128,192)", "input.crop_size", (128, 192)),
])
def test_overrides_parse_as_the_declared_type(assignment, path, expected):
    base = replace_path(get_config("tiny"), "solver.steps", ())
    value = override(base, [assignment])
    section, name = path.split(".")
    parsed = getattr(getattr(value, section), name)
    assert parsed == expected
    assert repr(parsed) == repr(expected)  # ints stay ints: (100,), not (100.0,)


def test_sampling_ratio_rule_is_the_ops():
    from fastdiffinst.ops import _checks

    for value in (-(2**31), -1, 0, 1, _checks.MAX_SAMPLING_RATIO):
        replace_path(get_config("tiny"), "head.pooler_sampling_ratio", value)
        assert _checks.sampling_ratio("roi_align", value) == value
    for value in (_checks.MAX_SAMPLING_RATIO + 1, -(2**31) - 1):
        with pytest.raises(ValueError, match="config: head.pooler_sampling_ratio"):
            replace_path(get_config("tiny"), "head.pooler_sampling_ratio", value)
        with pytest.raises(ValueError, match="roi_align: sampling_ratio"):
            _checks.sampling_ratio("roi_align", value)


@pytest.mark.parametrize("seed", [-(2**63), 2**64 - 1])
def test_every_valid_seed_seeds_the_training_draws(seed):
    """The seeds derived from solver.seed (augmentation by stream position, box draws by iteration
    and rank) are valid for every seed the config accepts."""
    from fastdiffinst.data.loader import derived_generator

    solver = replace_path(get_config("tiny"), "solver.seed", seed).solver
    torch.manual_seed(solver.seed)
    first = derived_generator((solver.seed * 1_000_003 + 10**9) * 64 + 7).initial_seed()
    assert 0 <= first < 2**64
    assert derived_generator(-1).initial_seed() == torch.Generator().manual_seed(-1).initial_seed()
    torch.manual_seed(0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_saved_configurations_read_back(name):
    """config_from_dict (checkpoint loading) of every preset, and of a run with the new boundary values."""
    assert config_from_dict(config_to_dict(get_config(name))) == get_config(name)
    data = config_to_dict(get_config(name))
    data["solver"]["steps"] = []  # json gives lists
    data["solver"]["seed"] = 2**64 - 1
    data["head"]["pooler_sampling_ratio"] = -1
    cfg = config_from_dict(data)
    assert cfg.solver.steps == () and cfg.solver.seed == 2**64 - 1 and cfg.head.pooler_sampling_ratio == -1
