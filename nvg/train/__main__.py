"""Training entry point.

    python -m nvg.train                      # main job: tiny tokenizer, then the tiny generator, on Fashion-MNIST
    python -m nvg.train tokenizer [--options]
    python -m nvg.train generator [--options]
    python -m nvg.train var [--options]
    torchrun --nproc_per_node 2 -m nvg.train tokenizer ...   # DDP (gloo on CPU, nccl on GPU)

Each subcommand's module defines a dataclass `TrainConfig` and `main(cfg: TrainConfig) -> dict`; every dataclass
field becomes a `--field-name` option (bools: `--flag / --no-flag`). Expected errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
import types

from ..cli import ArgumentParser, add_dataclass_args, dataclass_from_args, run

SUBCOMMANDS = {
    "tokenizer": "nvg.train.tokenizer",
    "generator": "nvg.train.generator",
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
    return mod


def parse(argv: list[str]):
    """argv (without the program name) -> (module, config). Values are validated by the config's __post_init__."""
    if not argv or argv[0] not in SUBCOMMANDS:
        raise ValueError(f"unknown subcommand {argv[0] if argv else ''!r}: expected one of {sorted(SUBCOMMANDS)} "
                         "(or no argument for the main job)")
    name = argv[0]
    mod = _load(name)
    parser = ArgumentParser(prog=f"python -m nvg.train {name}", description=mod.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, mod.TrainConfig, aliases=getattr(mod, "CLI_ALIASES", None))
    return mod, dataclass_from_args(mod.TrainConfig, parser.parse_args(argv[1:]))


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from .main_job import main_job

        return main_job()
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    mod, cfg = parse(argv)
    return mod.main(cfg)


if __name__ == "__main__":
    run(main, "python -m nvg.train")
    # Free the training state (models, optimizers, FSDP's communication handles) while the interpreter is fully alive:
    # a gloo work handle still holding tensors when the interpreter finalizes can abort the process (SIGABRT,
    # "terminate called without an active exception"), seen once in CI on a torchrun FSDP run.
    gc.collect()
