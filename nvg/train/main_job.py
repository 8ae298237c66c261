"""The main job, `python -m nvg.train` without arguments: the tiny tokenizer on the embedded Fashion-MNIST, then the
tiny generator on its tokens, within a fixed wall-clock budget on a 2-core CPU.

Run again, it starts afresh: the previous run under `out_dir` is moved to `<out_dir>.previous` (replacing an older
one there), and a line says so.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from . import generator as train_generator
from . import tokenizer as train_tokenizer

# The main job keeps to 15 minutes on a 2-core CPU (both cores: torch's default thread count). Measured on an idle
# 2-core machine: see README "Quick start".
MAIN_JOB_MINUTES = 14.0  # the whole job's budget (15 minutes less slack for slower 2-core machines)
MAIN_JOB_RESERVE_MINUTES = 0.8  # kept for encoding the dataset, the final pictures and the closing quality report
# (0.3 min on an idle 2-core machine)
MAIN_JOB_QUALITY_SAMPLES = 300  # samples (classes in turn) scored at the end: class accuracy and FD-proxy
# the tiny tokenizer: the 256-code variant of the 8x8 preset (an easier vocabulary for a generator trained for minutes)
MAIN_JOB_TOKENIZER = dict(preset="tiny-ae-32px-8x8-v256", dataset="fashion-mnist", steps=1000, batch_size=32, lr=4e-4,
                          ema_decay=0.995, max_minutes=4.5, image_every=250, ckpt_every=250)
# the generator: nvg.train.generator.TrainConfig's defaults are the main job's tiny CPU run (nvg-tiny-fast, 5000 steps
# of batch 8 at peak lr 6e-3, recording 2 Euler structure steps and CFG schedules 1 -> 7 / 1 -> 6 as its sampling
# defaults); main_job sets the time cap from what is left. The fast variant (prefix-cached structure flow): trained
# alike for this budget, ten runs each on two tokenizers, its means are at least as good as the official structure
# transformer's in FD-proxy and class accuracy (by far less than the spread of runs; README "Fast NVG", quality at
# equal budget), and it trains a few % more steps and samples faster.
MAIN_JOB_GENERATOR: dict = {}


def generator_minutes(budget: float, used: float) -> float:
    """Training minutes left to the main job's generator after `used` of `budget` minutes (at least one minute)."""
    return max(1.0, budget - used - MAIN_JOB_RESERVE_MINUTES)


def set_aside_previous(out_dir: str | Path) -> str | None:
    """Move a previous main-job run out of the way; returns the line that says what was done (None: nothing there)."""
    out = Path(out_dir)
    if not out.exists() or not any(out.iterdir()):
        return None
    previous = out.with_name(out.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    out.rename(previous)
    return f"main job: moved the previous run in {out} to {previous} (it is replaced the next time); starting afresh"


def report_quality(ckpt: str, n: int = MAIN_JOB_QUALITY_SAMPLES, batch_size: int = 100, seed: int = 0) -> list[dict]:
    """Sample n images (classes in turn) with `python -m nvg.sample`'s defaults and print their class accuracy and
    FD-proxy against the embedded Fashion-MNIST, each with its floor (held-out real images at the same count)."""
    import torch

    from ..eval import evaluate_samples, format_rows
    from ..sample import Sampler, load_generator

    model, tok, config = load_generator(ckpt)
    sampler = Sampler(model, tok)
    labels = torch.arange(n) % model.config.num_classes
    images = []
    for i, s in enumerate(range(0, n, batch_size)):
        x = sampler.sample(labels[s:s + batch_size], seed=seed + i)
        images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    rows = evaluate_samples(torch.cat(images), labels, reference="fashion-mnist")
    keep = [r for r in rows if r["metric"].startswith(("FD-proxy", "class accuracy"))]
    print(f"main job: quality of {n} samples (python -m nvg.sample defaults), floor = held-out real images\n"
          f"{format_rows(keep)}")
    return keep


def main_job(out_dir: str = "runs/main", budget_minutes: float | None = None, tokenizer: dict | None = None,
             generator: dict | None = None, quality_samples: int = MAIN_JOB_QUALITY_SAMPLES) -> dict:
    """Tiny tokenizer on the embedded Fashion-MNIST, then the tiny generator on its tokens.

    The whole job keeps to `budget_minutes` (default MAIN_JOB_MINUTES): the generator's time cap is what the tokenizer
    left of it, less MAIN_JOB_RESERVE_MINUTES for encoding the dataset and drawing the final samples. `tokenizer` /
    `generator` override fields of the MAIN_JOB_* settings (tests, experiments).
    """
    t0 = time.time()
    moved = set_aside_previous(out_dir)
    if moved:
        print(moved)
    budget = MAIN_JOB_MINUTES if budget_minutes is None else budget_minutes
    tok_cfg = train_tokenizer.TrainConfig(out_dir=f"{out_dir}/tokenizer", **{**MAIN_JOB_TOKENIZER, **(tokenizer or {})})
    tok = train_tokenizer.main(tok_cfg)
    results = {"tokenizer": {k: v for k, v in tok.items() if k != "model"}}
    overrides = {"tokenizer": tok["checkpoint"], "out_dir": f"{out_dir}/generator", **MAIN_JOB_GENERATOR,
                 **(generator or {})}
    left = generator_minutes(budget, (time.time() - t0) / 60)
    if overrides.get("max_minutes"):
        left = min(left, overrides["max_minutes"])
    overrides["max_minutes"] = left
    print(f"main job: {(time.time() - t0) / 60:.1f} of {budget:g} minutes used; the generator gets at most "
          f"{left:.1f} minutes of training")
    results["generator"] = train_generator.main(dataclasses.replace(train_generator.TrainConfig(), **overrides))
    if quality_samples and results["generator"].get("checkpoint"):
        results["quality"] = report_quality(results["generator"]["checkpoint"], quality_samples)
    results["minutes"] = (time.time() - t0) / 60
    print(f"main job: done in {results['minutes']:.1f} minutes")
    return results
