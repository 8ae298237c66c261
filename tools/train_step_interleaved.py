"""Eager against torch.compile for the official tiny generator's training step, interleaved in one process.

    python tools/train_step_interleaved.py [--blocks 8] [--steps 40] [--batch 8]

`pytest benchmarks/bench_train_step.py` times its rows one after another, so a VM whose speed drifts between rows puts
the drift into the ratio. Here both steps (benchmarks/bench_train_step.make_step: `nvg-tiny`, the official model, on
the main job's tokenizer, random weights) are built first (the compile time is printed), then run in alternating
blocks of `--steps` steps (eager first in even blocks, compiled first in odd ones); prints steps/s per block and the
total ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_train_step import make_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    steps = {}
    for mode in ("eager", "compile"):
        steps[mode], setup = make_step(a.batch, mode)
        print(f"{mode}: two warm-up steps in {setup:.1f} s (compiling included)", flush=True)
    total = {mode: 0.0 for mode in steps}
    for block in range(a.blocks):
        for mode in ("eager", "compile") if block % 2 == 0 else ("compile", "eager"):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                steps[mode]()
            dt = time.perf_counter() - t0
            total[mode] += dt
            print(f"block {block} {mode}: {a.steps / dt:.2f} steps/s", flush=True)
    n = a.blocks * a.steps
    eager, compiled = n / total["eager"], n / total["compile"]
    print(f"eager {eager:.2f} steps/s, compile {compiled:.2f} steps/s: compile {compiled / eager:.2f}x eager")


if __name__ == "__main__":
    main()
