"""Official checkpoints (spec §9) and ImageNet backbone weights.

Synthetic official state dicts for R-50, R-101 and Swin-B COCO are built here from the spec's
key and shape tables (not from our modules) and must load strictly after ``convert_official``;
torchvision ResNets loaded through ``load_backbone_weights`` must compute what torchvision computes.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fastdiffinst.checkpoint import (SCHEDULE_BUFFERS, CheckpointError, backbone_state_dict, convert_official,
                                     load_backbone_weights, load_official)
from fastdiffinst.config import get_config, override
from fastdiffinst.modeling import DiffusionInst
from fastdiffinst.reference.box_diffusion import cosine_schedule
from model_fixture import fixture


def _resnet_keys(blocks: list[int]) -> dict[str, tuple]:
    """spec §9.2: detectron2 ResNet keys (64-wide stem, bottleneck stages)."""
    keys = {}

    def conv(name, shape):
        keys[f"{name}.weight"] = shape
        for part in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.norm.{part}"] = (shape[0],)

    conv("stem.conv1", (64, 3, 7, 7))
    in_ch, width, out_ch = 64, 64, 256
    for stage, count in zip(range(2, 6), blocks):
        for b in range(count):
            prefix = f"res{stage}.{b}"
            if b == 0:
                conv(f"{prefix}.shortcut", (out_ch, in_ch, 1, 1))
            conv(f"{prefix}.conv1", (width, in_ch if b == 0 else out_ch, 1, 1))
            conv(f"{prefix}.conv2", (width, width, 3, 3))
            conv(f"{prefix}.conv3", (out_ch, width, 1, 1))
        in_ch, width, out_ch = out_ch, width * 2, out_ch * 2
    return keys


def _swin_keys() -> dict[str, tuple]:
    """spec §9.2: Swin-B keys."""
    keys = {"patch_embed.proj.weight": (128, 3, 4, 4), "patch_embed.proj.bias": (128,),
            "patch_embed.norm.weight": (128,), "patch_embed.norm.bias": (128,)}
    for i, (depth, heads) in enumerate(zip([2, 2, 18, 2], [4, 8, 16, 32])):
        c = 128 * 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            keys.update({f"{p}.norm1.weight": (c,), f"{p}.norm1.bias": (c,),
                         f"{p}.attn.relative_position_bias_table": (169, heads),
                         f"{p}.attn.relative_position_index": (49, 49),
                         f"{p}.attn.qkv.weight": (3 * c, c), f"{p}.attn.qkv.bias": (3 * c,),
                         f"{p}.attn.proj.weight": (c, c), f"{p}.attn.proj.bias": (c,),
                         f"{p}.norm2.weight": (c,), f"{p}.norm2.bias": (c,),
                         f"{p}.mlp.fc1.weight": (4 * c, c), f"{p}.mlp.fc1.bias": (4 * c,),
                         f"{p}.mlp.fc2.weight": (c, 4 * c), f"{p}.mlp.fc2.bias": (c,)})
        if i < 3:
            keys.update({f"layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
                         f"layers.{i}.downsample.norm.weight": (4 * c,), f"layers.{i}.downsample.norm.bias": (4 * c,)})
        keys.update({f"norm{i}.weight": (c,), f"norm{i}.bias": (c,)})
    return keys


def _head_keys(num_classes: int = 80, stages: int = 6) -> dict[str, tuple]:
    """spec §9.3."""
    keys = {}
    for i in range(3):
        keys[f"mask_refine.{i}.0.weight"] = (128, 256, 3, 3)
        keys.update({f"mask_refine.{i}.1.{p}": (128,) for p in ("weight", "bias", "running_mean", "running_var")})
        keys[f"mask_refine.{i}.1.num_batches_tracked"] = ()
    for k in range(4):
        keys[f"mask_head.{k}.0.weight"] = (128, 128, 3, 3)
        keys.update({f"mask_head.{k}.1.{p}": (128,) for p in ("weight", "bias", "running_mean", "running_var")})
        keys[f"mask_head.{k}.1.num_batches_tracked"] = ()
    keys.update({"mask_head.4.weight": (8, 128, 1, 1), "mask_head.4.bias": (8,),
                 "time_mlp.1.weight": (1024, 256), "time_mlp.1.bias": (1024,),
                 "time_mlp.3.weight": (1024, 1024), "time_mlp.3.bias": (1024,)})
    stage = {"self_attn.in_proj_weight": (768, 256), "self_attn.in_proj_bias": (768,),
             "self_attn.out_proj.weight": (256, 256), "self_attn.out_proj.bias": (256,),
             "inst_interact.dynamic_layer.weight": (32768, 256), "inst_interact.dynamic_layer.bias": (32768,),
             "inst_interact.norm1.weight": (64,), "inst_interact.norm1.bias": (64,),
             "inst_interact.norm2.weight": (256,), "inst_interact.norm2.bias": (256,),
             "inst_interact.out_layer.weight": (256, 12544), "inst_interact.out_layer.bias": (256,),
             "inst_interact.norm3.weight": (256,), "inst_interact.norm3.bias": (256,),
             "linear1.weight": (2048, 256), "linear1.bias": (2048,), "linear2.weight": (256, 2048),
             "linear2.bias": (256,), "controller.weight": (153, 256), "controller.bias": (153,),
             "block_time_mlp.1.weight": (512, 1024), "block_time_mlp.1.bias": (512,),
             "cls_module.0.weight": (256, 256), "cls_module.1.weight": (256,), "cls_module.1.bias": (256,),
             "class_logits.weight": (num_classes, 256), "class_logits.bias": (num_classes,),
             "bboxes_delta.weight": (4, 256), "bboxes_delta.bias": (4,)}
    for n in (1, 2, 3):
        stage.update({f"norm{n}.weight": (256,), f"norm{n}.bias": (256,)})
    for i in (0, 3, 6):
        stage.update({f"reg_module.{i}.weight": (256, 256), f"reg_module.{i + 1}.weight": (256,),
                      f"reg_module.{i + 1}.bias": (256,)})
    for s in range(stages):
        keys.update({f"head_series.{s}.{k}": v for k, v in stage.items()})
    return keys


def official_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """A synthetic official DiffusionInst state dict (meta tensors, real schedule buffers)."""
    schedule = cosine_schedule()
    state = {name: getattr(schedule, name).clone() for name in SCHEDULE_BUFFERS}
    if backbone == "swin":
        bottom_up, in_channels = _swin_keys(), [128, 256, 512, 1024]
    else:
        bottom_up, in_channels = _resnet_keys([3, 4, 23 if backbone == "r101" else 6, 3]), [256, 512, 1024, 2048]
    for level, cin in zip(range(2, 6), in_channels):
        for kind, shape in (("lateral", (256, cin, 1, 1)), ("output", (256, 256, 3, 3))):
            state[f"backbone.fpn_{kind}{level}.weight"] = torch.empty(shape, device="meta")
            state[f"backbone.fpn_{kind}{level}.bias"] = torch.empty((256,), device="meta")
    for name, shape in list(bottom_up.items()) + [("head." + k, v) for k, v in _head_keys().items()]:
        prefix = "backbone.bottom_up." if not name.startswith("head.") else ""
        dtype = torch.int64 if name.endswith(("num_batches_tracked", "relative_position_index")) else torch.float32
        state[prefix + name] = torch.empty(shape, dtype=dtype, device="meta")
    return state


@pytest.mark.parametrize("preset, backbone, count", [("r50_coco", "r50", 605), ("r101_coco", "r101", None),
                                                      ("swinb_coco", "swin", None)])
def test_synthetic_official_checkpoints_load_strictly(preset, backbone, count):
    state = official_state_dict(backbone)
    if count is not None:
        assert len(state) == count  # spec §9: 12 buffers + 281 backbone + 312 head
    with torch.device("meta"):
        model = DiffusionInst(get_config(preset))
    converted = convert_official(state)
    assert len(converted) == len(state) - 12
    load_official(model, state)
    assert set(converted) == set(model.state_dict())


def test_mismatched_checkpoint_lists_every_problem():
    state = official_state_dict("r50")
    del state["head.head_series.3.controller.bias"]
    state["head.head_series.6.controller.bias"] = torch.empty(153, device="meta")
    state["head.head_series.0.class_logits.weight"] = torch.empty((1203, 256), device="meta")
    with torch.device("meta"):
        model = DiffusionInst(get_config("r50_coco"))
    with pytest.raises(CheckpointError) as error:
        load_official(model, state)
    message = str(error.value)
    assert "missing keys (1)" in message and "head.head_series.3.controller.bias" in message
    assert "unexpected keys (1)" in message and "head.head_series.6.controller.bias" in message
    assert "head.head_series.0.class_logits.weight: checkpoint (1203, 256), model (80, 256)" in message


def test_schedule_buffers_are_checked():
    state = official_state_dict("r50")
    state["alphas_cumprod"] = state["alphas_cumprod"] * 0.99
    with pytest.raises(CheckpointError, match="alphas_cumprod"):
        convert_official(state)


def test_official_checkpoint_file_round_trip(tmp_path):
    record = fixture()
    path = tmp_path / "model_final.pth"
    torch.save({"model": record["state_dict"], "iteration": 90000, "optimizer": {}, "scheduler": {}}, path)
    model = DiffusionInst(get_config("official_small")).eval()
    load_official(model, path)
    converted = convert_official(record["state_dict"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, converted[name]), name
    assert torch.equal(model.mask_branch.mask_head[4].weight, record["state_dict"]["head.mask_head.4.weight"])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_official(model, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="does not match"):
        load_official(DiffusionInst(get_config("tiny")), path)


# ------------------------------------------------------------------------------------------------
# ImageNet backbone weights


def _torchvision_resnet(depth: int):
    import torchvision

    torch.manual_seed(depth)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    for module in net.modules():  # non-trivial statistics, so the test sees FrozenBN at work
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return net.eval()


def _torchvision_stages(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    outs = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        outs.append(x)
    return outs


def _model_with_backbone(depth: int) -> DiffusionInst:
    cfg = override(get_config("tiny"), [f"backbone.resnet.depth={depth}", "backbone.resnet.stem_out_channels=64",
                                        f"backbone.resnet.res2_out_channels={64 if depth < 50 else 256}",
                                        "backbone.resnet.freeze_at=2"])
    return DiffusionInst(cfg).eval()


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_imagenet_weights_compute_what_torchvision_computes(tmp_path, depth):
    net = _torchvision_resnet(depth)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(net.state_dict(), path)
    model = _model_with_backbone(depth)
    load_backbone_weights(model, path)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        theirs = _torchvision_stages(net, x)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The frozen stem/res2 stay frozen after loading.
    assert not model.backbone.bottom_up.stem.conv1.weight.requires_grad


def test_detectron2_named_pickle_and_caffe2_names(tmp_path):
    net = _torchvision_resnet(18)
    model = _model_with_backbone(18)
    # A detectron2-named pickle (as tools/convert-torchvision-to-d2.py writes), with numpy arrays.
    names = {"conv1.": "stem.conv1.", "bn1.": "stem.conv1.norm."}
    d2 = {}
    for k, v in net.state_dict().items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        for old, new in names.items():
            if k.startswith(old):
                k = new + k[len(old):]
        if k.startswith("layer"):
            stage, rest = k.split(".", 1)
            k = f"res{int(stage[5:]) + 1}.{rest}"
            k = k.replace(".bn1.", ".conv1.norm.").replace(".bn2.", ".conv2.norm.")
            k = k.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        d2[k] = v.numpy()
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": d2, "__author__": "torchvision", "matching_heuristics": True}, f)
    load_backbone_weights(model, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.bottom_up(x)[-1], _torchvision_stages(net, x)[-1],
                                   rtol=1e-4, atol=1e-4)
    caffe2 = tmp_path / "R-50-caffe2.pkl"
    with open(caffe2, "wb") as f:
        pickle.dump({"blobs": None, "conv1_w": np.zeros((64, 3, 7, 7), np.float32),
                     "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32)}, f)
    with pytest.raises(CheckpointError, match="Caffe2"):
        backbone_state_dict({"conv1_w": np.zeros(1), "res2_0_branch2a_w": np.zeros(1)})
    with pytest.raises(CheckpointError):
        load_backbone_weights(model, caffe2)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_backbone_weights(model, {k: torch.from_numpy(v) for k, v in list(d2.items())[:-3]})
