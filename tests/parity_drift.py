"""Prints how far this machine is from the golden fixture, stage by stage: the relative error
(max |ours - recorded| / max |recorded|) of every teacher-forced and end-to-end comparison of
the parity tests, on both ``ops_impl``s, as JSON lines.

    python tests/parity_drift.py [--label NAME] > drift.jsonl

Run it on a new kind of CPU, and under the instruction-set limits this CPU can emulate (the
kernels torch, oneDNN and MKL choose, hence their summation orders, change with them), e.g.

    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \\
        python tests/parity_drift.py --label sse41

``tests/data/README.md`` ("Drift") records what such runs gave and how the end-to-end
tolerances follow from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import model_fixture as mf

ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="default", help="a name for this run's settings")
    args = parser.parse_args()
    header = dict(label=args.label, cpu=cpu_name(), capability=torch.backends.cpu.get_cpu_capability(),
                  torch=torch.__version__, env={k: os.environ[k] for k in ISA_VARIABLES if k in os.environ})
    print(json.dumps(header))
    for impl in ("fused", "reference"):
        for run in mf.INFERENCE_RUNS:
            forced = mf.teacher_forced_inference(run, impl)["pairs"]
            ended = mf.end_to_end_pairs(run, mf.end_to_end_inference(run, impl))
            for kind, pairs in (("teacher_forced", forced), ("end_to_end", ended)):
                for name, (ours, recorded) in pairs.items():
                    print(json.dumps(dict(label=args.label, impl=impl, run=run, kind=kind, stage=name,
                                          rel=mf.relative_error(ours, recorded))))
        forced = mf.teacher_forced_training(impl)
        for name, (ours, recorded) in forced["pairs"].items():
            print(json.dumps(dict(label=args.label, impl=impl, run="train", kind="teacher_forced", stage=name,
                                  rel=mf.relative_error(ours, recorded))))
        ended = mf.end_to_end_training(impl)
        for name, (ours, recorded) in mf.training_pairs(ended).items():
            print(json.dumps(dict(label=args.label, impl=impl, run="train", kind="end_to_end", stage=name,
                                  rel=mf.relative_error(ours, recorded))))
        for name, error in mf.gradient_errors(ended).items():
            print(json.dumps(dict(label=args.label, impl=impl, run="train", kind="end_to_end", stage=f"grad {name}",
                                  rel_l2=error)))
        for kind, losses in (("teacher_forced", forced["losses"]), ("end_to_end", ended["outputs"].losses)):
            for name, value in losses.items():
                abs_error = abs(float(value.detach()) - forced["record"]["losses"][name])
                print(json.dumps(dict(label=args.label, impl=impl, run="train", kind=kind, stage=name,
                                      abs=abs_error)))


if __name__ == "__main__":
    main()
