"""r50_coco's backbone + FPN (+ mask branch) in fp32 at 800x1216, ours against detectron2's own
``build_resnet_fpn_backbone`` with the same weights (issue 19's fp32 item). Not part of the project:
it needs a detectron2 checkout and its Python dependencies (fvcore, iopath, omegaconf, hydra-core,
cloudpickle) on PYTHONPATH, e.g.

    PYTHONPATH=/tmp/d2:/tmp/d2deps .venv/bin/python benchmarks/results/20261207-backbone-vs-detectron2-cpu/compare.py

The variants alternate (A B A B, the order reversed every other round); medians with min-max, and
the minor page faults of each call. The mask branch is ours on both sides (the official
DiffusionInst builds the same Conv-BN-ReLU tower in its detector; detectron2 has none).
"""

import resource
import statistics
import sys
import time

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

from fastdiffinst.config import get_config
from fastdiffinst.modeling import DiffusionInst

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 8
torch.set_num_threads(2)
cfg = get_cfg()
cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # DiffusionInst's R-50 (docs/official-model.md)
detectron2 = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).eval()
torch.manual_seed(0)
model = DiffusionInst(get_config("r50_coco")).eval()
detectron2.load_state_dict(model.backbone.state_dict(), strict=True)
x = torch.randn(1, 3, 800, 1216, generator=torch.Generator().manual_seed(0))


def detectron2_pyramid():
    features = detectron2(x)
    return [features[k] for k in ("p2", "p3", "p4", "p5")]


VARIANTS = {
    "backbone+FPN": {"ours": lambda: model.backbone(x), "detectron2": detectron2_pyramid},
    "backbone+FPN+mask branch": {"ours": lambda: model.mask_branch(model.backbone(x)),
                                 "detectron2": lambda: model.mask_branch(detectron2_pyramid())},
    # What DiffusionInst.forward runs: the above, plus channels-last copies of P2-P5 for our RoIAlign.
    "extract_features": {"ours": lambda: model.extract_features(x),
                         "detectron2": lambda: model.mask_branch(detectron2_pyramid())},
}

print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 1x3x800x1216 fp32, {ROUNDS} rounds")
with torch.inference_mode():
    ours, theirs = model.backbone(x), detectron2_pyramid()
    print("P2-P5 max |ours - detectron2|:", [float((a - b).abs().max()) for a, b in zip(ours, theirs)])
    for part, calls in VARIANTS.items():
        times = {name: [] for name in calls}
        faults = {name: [] for name in calls}
        for call in calls.values():
            call()  # warm-up
        for r in range(ROUNDS):
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            print(f"{part:26s} {name:10s} {medians[name]:.3f} s ({min(t):.3f}-{max(t):.3f}), "
                  f"minor faults {statistics.median(faults[name]):.0f}")
        print(f"{part:26s} detectron2 / ours = {medians['detectron2'] / medians['ours']:.3f}")
