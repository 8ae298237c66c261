"""Training entry point.

    python -m nvg.train                      # main job: tiny tokenizer, then the tiny generator, on Fashion-MNIST
    python -m nvg.train tokenizer [--options]
    python -m nvg.train generator [--options]
    python -m nvg.train var [--options]
    torchrun --nproc_per_node 2 -m nvg.train tokenizer ...   # DDP (gloo on CPU, nccl on GPU)

Each subcommand's module defines a dataclass `TrainConfig` and `main(cfg: TrainConfig) -> dict`; every dataclass
field becomes a `--field-name` option (bools: `--flag / --no-flag`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import sys
import time
import types
import typing

SUBCOMMANDS = {
    "tokenizer": "nvg.train_tokenizer",
    "generator": "nvg.train_generator",
    "var": "nvg.baselines.var.train",
}


def _load(name: str) -> types.ModuleType:
    module = SUBCOMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise SystemExit(f"`python -m nvg.train {name}` needs {module}, which is not part of this installation")
        raise
    if not (hasattr(mod, "TrainConfig") and hasattr(mod, "main")):
        raise SystemExit(f"{module} must define a dataclass TrainConfig and main(cfg)")
    return mod


def _field_type(tp):
    """(parser type, is_bool) of a dataclass field annotation such as `int`, `str | None`, `float | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if (typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1) else tp
    if base is bool:
        return None, True
    if base in (int, float, str):
        return base, False
    if typing.get_origin(base) in (tuple, list):
        inner = typing.get_args(base)[0] if typing.get_args(base) else str
        return inner, False
    return str, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        opt = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp, is_bool = _field_type(hints[f.name])
        if is_bool:
            parser.add_argument(opt, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(hints[f.name]) in (tuple, list) or isinstance(default, tuple | list):
            parser.add_argument(opt, dest=f.name, type=tp, nargs="+", default=default, metavar=f.name.upper())
        else:
            parser.add_argument(opt, dest=f.name, type=tp, default=default, help=f"(default: {default})")


def dataclass_from_args(cls, ns: argparse.Namespace):
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if isinstance(values[f.name], list) and isinstance(f.default, tuple):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def parse(argv: list[str]):
    """argv (without the program name) -> (module, config)."""
    if not argv or argv[0] not in SUBCOMMANDS:
        if argv and not argv[0].startswith("-"):
            raise SystemExit(f"unknown subcommand {argv[0]!r}: expected one of {sorted(SUBCOMMANDS)}")
    name = argv[0]
    mod = _load(name)
    parser = argparse.ArgumentParser(prog=f"python -m nvg.train {name}", description=mod.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, mod.TrainConfig)
    return mod, dataclass_from_args(mod.TrainConfig, parser.parse_args(argv[1:]))


def main_job(out_dir: str = "runs/main", budget_minutes: float | None = None, tokenizer: dict | None = None,
             generator: dict | None = None) -> dict:
    """Tiny tokenizer on the embedded Fashion-MNIST, then (when present) the tiny generator on its tokens.

    The whole job keeps to `budget_minutes` (default MAIN_JOB_MINUTES): the generator's time cap is what the tokenizer
    left of it, less MAIN_JOB_RESERVE_MINUTES for encoding the dataset and drawing the final samples. `tokenizer` /
    `generator` override fields of the MAIN_JOB_* settings (tests, experiments).
    """
    from . import train_tokenizer

    t0 = time.time()
    budget = MAIN_JOB_MINUTES if budget_minutes is None else budget_minutes
    tok_cfg = train_tokenizer.TrainConfig(out_dir=f"{out_dir}/tokenizer", **{**MAIN_JOB_TOKENIZER, **(tokenizer or {})})
    tok = train_tokenizer.main(tok_cfg)
    results = {"tokenizer": {k: v for k, v in tok.items() if k != "model"}}
    try:
        gen = importlib.import_module("nvg.train_generator")
    except ModuleNotFoundError as e:
        if e.name != "nvg.train_generator":
            raise
        print("nvg.train_generator is not available: trained the tokenizer only")
        return results
    fields = {f.name for f in dataclasses.fields(gen.TrainConfig)}
    overrides = {k: v for k, v in {"tokenizer": tok["checkpoint"], "out_dir": f"{out_dir}/generator",
                                   **MAIN_JOB_GENERATOR, **(generator or {})}.items() if k in fields}
    left = generator_minutes(budget, (time.time() - t0) / 60)
    if overrides.get("max_minutes"):
        left = min(left, overrides["max_minutes"])
    overrides["max_minutes"] = left
    print(f"main job: {(time.time() - t0) / 60:.1f} of {budget:g} minutes used; the generator gets at most "
          f"{left:.1f} minutes of training")
    results["generator"] = gen.main(dataclasses.replace(gen.TrainConfig(), **overrides))
    results["minutes"] = (time.time() - t0) / 60
    print(f"main job: done in {results['minutes']:.1f} minutes")
    return results


def generator_minutes(budget: float, used: float) -> float:
    """Training minutes left to the main job's generator after `used` of `budget` minutes (at least one minute)."""
    return max(1.0, budget - used - MAIN_JOB_RESERVE_MINUTES)


# The main job keeps to 15 minutes on a 2-core CPU (both cores: torch's default thread count). Measured on an idle
# 2-core machine: see README "Quick start".
MAIN_JOB_MINUTES = 14.0  # the whole job's budget (15 minutes less slack for slower 2-core machines)
MAIN_JOB_RESERVE_MINUTES = 0.8  # kept for encoding the dataset and drawing the final sample grid and strip
# the tiny tokenizer: the 256-code variant of the 8x8 preset (an easier vocabulary for a generator trained for minutes)
MAIN_JOB_TOKENIZER = dict(preset="tiny-ae-32px-8x8-v256", dataset="fashion-mnist", steps=1000, batch_size=32, lr=4e-4,
                          ema_decay=0.995, max_minutes=4.5, image_every=250, ckpt_every=250)
# the generator: nvg.train_generator.TrainConfig's defaults are the main job's tiny CPU run (nvg-tiny, 5000 steps of
# batch 8 at peak lr 3e-3) plus these; main_job sets the time cap from what is left of the budget.
# sample_steps=1: the grids draw each split from one Euler step of the structure flow (its estimate of the structure
# embedding given the noise) instead of the official 25. After ten CPU-minutes the flow has learned the class
# silhouettes but not yet a sharp transport: 25 steps give ragged, hole-ridden silhouettes, one step clean ones.
# `python -m nvg.sample` keeps the official 25 (README, "Quick start").
MAIN_JOB_GENERATOR = dict(sample_steps=1)


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return main_job()
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    mod, cfg = parse(argv)
    return mod.main(cfg)


if __name__ == "__main__":
    main()
    # Free the training state (models, optimizers, FSDP's communication handles) while the interpreter is fully alive:
    # a gloo work handle still holding tensors when the interpreter finalizes can abort the process (SIGABRT,
    # "terminate called without an active exception"), seen once in CI on a torchrun FSDP run.
    gc.collect()
