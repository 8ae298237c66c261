"""Sample quality against the number of structure-flow steps (and the solver), for one or more generator runs.

    python tools/quality_vs_steps.py --ckpt runs/q/faithful --steps 1 2 4 8 25 --solvers euler heun --n 1000 \
        --json runs/q/faithful_steps.json

For every (steps, solver): n samples, classes in turn, drawn with `python -m nvg.sample`'s defaults except those two
settings (EMA weights, the model's CFG schedules, the official top-p schedule, batch 100, seed = batch index), scored
by the same function as `python -m nvg.eval --samples FILE --n N` (FD-proxy, precision, recall, class accuracy, each
with its floor), and timed (images/s, decode included). Prints one markdown table row per setting; --json keeps every
row.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nvg.eval import evaluate_samples
from nvg.sample import SampleConfig, Sampler, load_generator


def draw(sampler, n: int, config, batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """n uint8 images, classes in turn, batch `batch_size`, seed = batch index (an NVG Sampler or a VARSampler)."""
    labels = torch.arange(n) % sampler.model.config.num_classes
    images = []
    for i, s in enumerate(range(0, n, batch_size)):
        x = sampler.sample(labels[s:s + batch_size], config, seed=i)
        images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(images), labels


def row_values(rows: list[dict]) -> dict:
    pick = {"fd": "FD-proxy", "precision": "precision (k=3, FD-proxy", "recall": "recall (k=3, FD-proxy",
            "class_acc": "class accuracy"}
    out = {}
    for key, prefix in pick.items():
        r = next(r for r in rows if r["metric"].startswith(prefix))
        out[key], out[key + "_floor"] = r["value"], r["floor"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", nargs="+", required=True, help="generator run or checkpoint directories")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 25])
    ap.add_argument("--solvers", nargs="+", default=["euler"])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--content-cfg", type=float, nargs=2, default=None, metavar=("START", "END"),
                    help="content CFG schedule (default: the model's, as nvg.sample)")
    ap.add_argument("--structure-cfg", type=float, nargs=2, default=None, metavar=("START", "END"),
                    help="structure CFG schedule (default: the model's, as nvg.sample)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    guidance = dict(content_cfg=a.content_cfg and tuple(a.content_cfg),
                    structure_cfg=a.structure_cfg and tuple(a.structure_cfg))
    results = []
    print("| run | preset variant | solver | steps | FD-proxy ↓ (floor) | precision (floor) | recall (floor) | "
          "class acc. (floor) | images/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for ckpt in a.ckpt:
        model, tok, config = load_generator(ckpt)
        sampler = Sampler(model, tok)
        variant = model.config.structure_attention
        for solver in a.solvers:
            for steps in a.steps:
                sc = SampleConfig(structure_steps=steps, structure_solver=solver, **guidance)
                t0 = time.perf_counter()
                images, labels = draw(sampler, a.n, sc)
                speed = a.n / (time.perf_counter() - t0)
                v = row_values(evaluate_samples(images, labels, reference="fashion-mnist"))
                v.update(run=ckpt, variant=variant, solver=solver, steps=steps, n=a.n, images_per_s=speed,
                         threads=torch.get_num_threads())
                results.append(v)
                print(f"| {ckpt} | {variant} | {solver} | {steps} | {v['fd']:.2f} ({v['fd_floor']:.2f}) | "
                      f"{v['precision']:.3f} ({v['precision_floor']:.3f}) | {v['recall']:.3f} "
                      f"({v['recall_floor']:.3f}) | {v['class_acc']:.3f} ({v['class_acc_floor']:.3f}) | "
                      f"{speed:.1f} |", flush=True)
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
