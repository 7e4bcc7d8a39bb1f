"""Phase times of a tiny training iteration: python phases.py PRECISION"""
import sys, time, tempfile, collections
from pathlib import Path
import torch
torch.set_num_threads(2)
from fastdiffinst.config import get_config
from fastdiffinst.engine.train import Trainer, TrainOptions
from fastdiffinst.modeling import DiffusionInst
precision = sys.argv[1]
acc = collections.defaultdict(float)
def wrap(cls, name, label):
    f = getattr(cls, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); acc[label] += time.perf_counter() - t; return r
    setattr(cls, name, g)
wrap(DiffusionInst, "extract_features", "backbone + FPN + mask branch forward")
wrap(DiffusionInst, "run_head", "decoder forward")
wrap(DiffusionInst, "forward", "forward total")
tr = Trainer(get_config("tiny"), TrainOptions(out=Path(tempfile.mkdtemp()) / "r", precision=precision, progress=False))
loader = tr._loader()
def it():
    t = time.perf_counter(); batch = next(loader); acc["data loading"] += time.perf_counter() - t
    t = time.perf_counter(); tr._train_iteration(batch); acc["iteration total"] += time.perf_counter() - t
for _ in range(10): it()
acc.clear(); n = 30
t0 = time.perf_counter()
for _ in range(n): it()
wall = time.perf_counter() - t0
rows = {k: v / n * 1000 for k, v in acc.items()}
fwd = rows.pop("forward total"); total = rows.pop("iteration total")
rows["matcher + losses (rest of forward)"] = fwd - rows["backbone + FPN + mask branch forward"] - rows["decoder forward"]
rows["backward + clipping + AdamW"] = total - fwd
print(precision, f"wall {wall / n * 1000:.0f} ms/it ({4 * n / wall:.1f} img/s)")
for k, v in rows.items(): print(f"  {k}: {v:.0f} ms ({v / (wall / n * 1000) * 100:.0f} %)")
