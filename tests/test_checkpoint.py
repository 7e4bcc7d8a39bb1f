"""Official checkpoints (docs/official-model.md §9) and ImageNet backbone weights.

Synthetic official state dicts for R-50, R-101 and Swin-B COCO are built here from the key and
shape tables of docs/official-model.md §9 (not from our modules) and must load strictly after
``convert_official``; torchvision ResNets loaded through ``load_backbone_weights`` must compute what
torchvision computes.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fastdiffinst.checkpoint import (
    CheckpointError,
    backbone_state_dict,
    convert_official,
    load_backbone_weights,
    load_official,
)
from fastdiffinst.config import get_config, override
from fastdiffinst.modeling import DiffusionInst
from model_fixture import fixture
from official_keys import official_state_dict


@pytest.mark.parametrize("preset, backbone, count", [("r50_coco", "r50", 605), ("r101_coco", "r101", 605 + 17 * 15),
                                                      ("swinb_coco", "swin", None), ("r50_lvis", "r50", 606)])
def test_synthetic_official_checkpoints_load_strictly(preset, backbone, count):
    config = get_config(preset)
    state = official_state_dict(backbone, config.num_classes)
    if count is not None:
        # docs/official-model.md §9: 12 buffers + 281 backbone + 312 head (+ LVIS fed-loss weights)
        assert len(state) == count
    with torch.device("meta"):
        model = DiffusionInst(config)
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
                                        "backbone.resnet.freeze_at=2", "backbone.resnet.norm=FrozenBN"])
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
    # Metadata beside the weights (no "model" wrapper) is skipped.
    bare = tmp_path / "R-18-bare.pkl"
    with open(bare, "wb") as f:
        pickle.dump({**d2, "__author__": "torchvision", "matching_heuristics": True}, f)
    load_backbone_weights(model, bare)
    # Detectron (Caffe2) pickles: {"blobs": {...}} with Caffe2 names.
    caffe2 = tmp_path / "R-50-caffe2.pkl"
    with open(caffe2, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32),
                               "res_conv1_bn_s": np.ones(64, np.float32),
                               "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32)},
                     "__author__": "Detectron"}, f)
    with pytest.raises(CheckpointError, match="Caffe2"):
        load_backbone_weights(model, caffe2)
    with pytest.raises(CheckpointError, match="Caffe2"):
        backbone_state_dict({"conv1_w": np.zeros(1), "res2_0_branch2a_w": np.zeros(1)})
    with pytest.raises(CheckpointError, match="no tensors"):
        backbone_state_dict({"__author__": "nobody"})
    with pytest.raises(CheckpointError, match="missing keys"):
        load_backbone_weights(model, {k: torch.from_numpy(v) for k, v in list(d2.items())[:-3]})


def test_swin_backbone_weights_with_detectron2_prefix():
    cfg = override(get_config("tiny"), ["backbone.name=swin", "backbone.swin.embed_dim=16",
                                        "backbone.swin.depths=(2,2,2,2)", "backbone.swin.num_heads=(1,2,2,4)"])
    source, target = DiffusionInst(cfg).eval(), DiffusionInst(cfg).eval()
    weights = {f"backbone.bottom_up.{k}": v for k, v in source.backbone.bottom_up.state_dict().items()}
    weights["backbone.fpn_lateral2.weight"] = torch.zeros(1)  # other parts of a full model are ignored
    load_backbone_weights(target, weights)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(target.backbone.bottom_up(x), source.backbone.bottom_up(x)):
            assert torch.equal(a, b)
