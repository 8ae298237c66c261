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
import importlib
import sys
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


def main_job(out_dir: str = "runs/main") -> dict:
    """Tiny tokenizer on the embedded Fashion-MNIST, then (when present) the tiny generator on its tokens."""
    from . import train_tokenizer

    tok_cfg = train_tokenizer.TrainConfig(out_dir=f"{out_dir}/tokenizer", **MAIN_JOB_TOKENIZER)
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
                                   **MAIN_JOB_GENERATOR}.items() if k in fields}
    results["generator"] = gen.main(dataclasses.replace(gen.TrainConfig(), **overrides))
    return results


# the tiny tokenizer of the main job: the 256-code variant of the 8x8 preset, capped at 4.5 minutes so that the
# generator gets most of the 15-minute budget. One thread keeps the speed predictable on busy machines.
# Measured (one full `python -m nvg.train`, 2 shared cores, load average 1-2): tokenizer 1000 steps in 2.8 min, val PSNR
# 23.6 dB (EMA); generator 2200 steps of batch 8 in 8.3 min; 11.6 min in all.
MAIN_JOB_TOKENIZER = dict(preset="tiny-ae-32px-8x8-v256", dataset="fashion-mnist", steps=1000, batch_size=32, lr=4e-4,
                          ema_decay=0.995, max_minutes=4.5, image_every=250, ckpt_every=250, threads=1)
# the generator of the main job: nvg.train_generator.TrainConfig's defaults plus these. The time cap leaves the main job
# inside its 15 minutes on 2 cores (the tokenizer takes about 3); without it the run ends after `steps`.
MAIN_JOB_GENERATOR = dict(threads=1, steps=2900, max_minutes=11.0)


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
