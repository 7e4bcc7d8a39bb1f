"""r50_coco, 512², 500 proposals, bf16 inference: the model with packed convolutions against the
same model whose half-precision copies leave the convolutions unpacked (``packable`` patched to
refuse them while that model makes its copies), alternated in one process (10 calls each, the
order reversed every other round). Checks that the detections are equal first.

    DIR=benchmarks/results/20261207-precision-study-packed-convs-avx512bf16-cpu
    PYTHONPATH=. .venv/bin/python $DIR/ab_packed_convs.py
"""

import statistics
import time

import torch

import fastdiffinst.modeling.precision as precision
from fastdiffinst.config import get_config, replace_path
from fastdiffinst.modeling import DiffusionInst

torch.set_num_threads(2)
cfg = replace_path(replace_path(get_config("r50_coco"), "num_proposals", 500), "sampler.sample_steps", 1)
images = [torch.randint(0, 256, (3, 512, 512), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)]
models, outputs = {}, {}
for name in ("convs packed", "convs plain"):
    if name == "convs plain":
        precision.packable = lambda conv: False  # this model's copies keep F.conv2d
    torch.manual_seed(0)
    models[name] = DiffusionInst(cfg, precision="bf16").eval()
    with torch.no_grad():
        outputs[name] = models[name](images, generator=torch.Generator().manual_seed(1))[0]
a, b = outputs.values()
print("detections equal:", all(torch.equal(a[k], b[k]) for k in a), len(a["boxes"]))
times = {name: [] for name in models}
with torch.no_grad():
    for r in range(10):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            start = time.perf_counter()
            models[name](images, generator=torch.Generator().manual_seed(1))
            times[name].append(time.perf_counter() - start)
for name, t in times.items():
    print(f"{name}: median {statistics.median(t):.3f} s ({min(t):.3f}-{max(t):.3f})")
