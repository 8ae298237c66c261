"""Sample quality against the classifier-free guidance schedule, for an NVG generator run or a VAR run.

    python tools/quality_vs_guidance.py --ckpt runs/main/generator --content-end 3.5 5 7 10 --structure-end 2.5 6 \
        --n 1000 --json runs/guidance.json
    python tools/quality_vs_guidance.py --var runs/eq/var --content-end 2.5 4 6 --n 1000

For every (content END, structure END): n samples, classes in turn, batch 100, seed = batch index, drawn as
`python -m nvg.sample --n 100` would with `--content-cfg 1 END --structure-cfg 1 END` and every other setting at its
default; VAR runs as their training run's own evaluation samples them (`--var RUN`: its tokenizer and transformer, the
run's top-k / top-p) with `content_cfg = (1, END)`, i.e. cfg_scale = END - 1. Scored by the function behind
`python -m nvg.eval --samples FILE --n N` (FD-proxy, precision, recall, class accuracy, each with its floor). Prints one
markdown table row per setting; --json keeps every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from nvg import checkpoint
from nvg.baselines.var.convert import load_var, load_vqvae
from nvg.baselines.var.sample import VARSampleConfig
from nvg.baselines.var.sampler import VARSampler
from nvg.eval import evaluate_samples
from nvg.sample import SampleConfig, Sampler, load_generator
from quality_vs_steps import draw, row_values


def settings(a) -> list[tuple[float, float | None]]:
    structure = a.structure_end if a.ckpt else [None]
    return [(c, s) for c in a.content_end for s in structure]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="NVG generator run or checkpoint directory")
    src.add_argument("--var", help="VAR run directory of `python -m nvg.train var` (tokenizer/ and transformer/)")
    ap.add_argument("--content-end", type=float, nargs="+", default=[3.5], help="content CFG at the last stage / scale")
    ap.add_argument("--structure-end", type=float, nargs="+", default=[2.5], help="structure CFG at the last stage")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.ckpt:
        model, tok, _ = load_generator(a.ckpt)
        sampler = Sampler(model, tok)
    else:
        run = checkpoint.open_checkpoint(os.path.join(a.var, "transformer"), "var")
        train = run.config["train"]
        var = load_var(run.path)
        sampler = VARSampler(var, load_vqvae(os.path.join(a.var, "tokenizer")))
    results = []
    print("| run | content CFG | structure CFG | FD-proxy ↓ (floor) | precision (floor) | recall (floor) | "
          "class acc. (floor) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for content, structure in settings(a):
        if a.ckpt:
            sc = SampleConfig(content_cfg=(1.0, content), structure_cfg=(1.0, structure))
        else:
            sc = VARSampleConfig(content_cfg=(1.0, content), top_k=train["top_k"], top_p=train["top_p"])
        images, labels = draw(sampler, a.n, sc)
        v = row_values(evaluate_samples(images, labels, reference="fashion-mnist"))
        v.update(run=a.ckpt or a.var, settings=dataclasses.asdict(sc), n=a.n)
        results.append(v)
        print(f"| {a.ckpt or a.var} | 1 → {content:g} | {'1 → %g' % structure if structure else '-'} | "
              f"{v['fd']:.2f} ({v['fd_floor']:.2f}) | {v['precision']:.3f} ({v['precision_floor']:.3f}) | "
              f"{v['recall']:.3f} ({v['recall_floor']:.3f}) | {v['class_acc']:.3f} ({v['class_acc_floor']:.3f}) |",
              flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
