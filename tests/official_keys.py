"""Official DiffusionInst checkpoint layouts, built from the tables of docs/official-model.md §9.2
and §9.3 and never from our modules: the expected keys and shapes of detectron2 ResNets, Swin-B and
the head."""

from __future__ import annotations

import torch

from fastdiffinst.checkpoint import SCHEDULE_BUFFERS
from fastdiffinst.common.diffusion import cosine_schedule


def resnet_keys(blocks: list[int]) -> dict[str, tuple]:
    """docs/official-model.md §9.2: detectron2 ResNet keys (64-wide stem, bottleneck stages)."""
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


def swin_b_keys() -> dict[str, tuple]:
    """docs/official-model.md §9.2: Swin-B keys."""
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


def head_keys(num_classes: int = 80, stages: int = 6) -> dict[str, tuple]:
    """docs/official-model.md §9.3."""
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


def official_state_dict(backbone: str, num_classes: int = 80) -> dict[str, torch.Tensor]:
    """A synthetic official DiffusionInst state dict for ``backbone`` in {"r50", "r101", "swin"}
    (meta tensors, real schedule buffers); LVIS (1203 classes) adds the federated-loss weights."""
    schedule = cosine_schedule()
    state = {name: getattr(schedule, name).clone() for name in SCHEDULE_BUFFERS}
    if backbone == "swin":
        bottom_up, in_channels = swin_b_keys(), [128, 256, 512, 1024]
    else:
        bottom_up, in_channels = resnet_keys([3, 4, 23 if backbone == "r101" else 6, 3]), [256, 512, 1024, 2048]
    for level, cin in zip(range(2, 6), in_channels):
        for kind, shape in (("lateral", (256, cin, 1, 1)), ("output", (256, 256, 3, 3))):
            state[f"backbone.fpn_{kind}{level}.weight"] = torch.empty(shape, device="meta")
            state[f"backbone.fpn_{kind}{level}.bias"] = torch.empty((256,), device="meta")
    for name, shape in list(bottom_up.items()) + [("head." + k, v) for k, v in head_keys(num_classes).items()]:
        prefix = "backbone.bottom_up." if not name.startswith("head.") else ""
        dtype = torch.int64 if name.endswith(("num_batches_tracked", "relative_position_index")) else torch.float32
        state[prefix + name] = torch.empty(shape, dtype=dtype, device="meta")
    if num_classes == 1203:
        state["criterion.fed_loss_cls_weights"] = torch.empty(num_classes, device="meta")
    return state
