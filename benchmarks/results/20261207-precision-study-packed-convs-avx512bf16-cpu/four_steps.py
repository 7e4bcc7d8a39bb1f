"""The precision study's 4-step case alone (official fp32, ours fp32, ours bf16; 5 interleaved
rounds), with or without the study's FLOP count before the timing, in a fresh process:

    DIR=benchmarks/results/20261207-precision-study-packed-convs-avx512bf16-cpu
    PYTHONPATH=. .venv/bin/python $DIR/four_steps.py flops     # or noflops

Written to tell whether the FLOP count (one extra call of ours fp32 before the timing) moved the
baseline of the full study's 4-step row; NOTES.md has the four runs.
"""

import sys

import torch

import benchmarks.precision_study as study
from benchmarks.harness import ceilings

torch.set_num_threads(2)
if sys.argv[1] == "noflops":
    study.dense_flops = lambda call: 1e9  # skip the counting call
study.PROFILES["four"] = study.Profile("r50_coco", (study.Case(512, 1, 500, 4, ("official fp32", "ours fp32",
                                                                                 "ours bf16")),), 5, 1)


class Silent:
    def update(self, n):
        pass


for row in study.run("cpu", "four", Silent(), ceilings("cpu")):
    print(sys.argv[1], row["direction"], row["ours_ms"], row["ours_range_ms"], row["baseline_ms"],
          row["baseline_range_ms"], row["speedup"])
