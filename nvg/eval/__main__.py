"""Offline evaluation: FD-proxy, FID, precision/recall and class accuracy of samples; reconstruction metrics of the
tokenizer. Nothing is downloaded.

    python -m nvg.eval --samples samples.npz [--reference fashion-mnist] [--fid] [--n 1000] [--classes 0 3]
    python -m nvg.eval tokenizer --ckpt runs/tokenizer [--dataset fashion-mnist] [--n 1000] [--fid]

Every number is printed with its sample count and its floor: the same metric between two sets of real images of
the same size (held-out real images against the reference), the value a perfect generator would get at that count.
Reference: a dataset name from nvg.data (its `train` split is the reference, its `val` split gives the floor) or a
folder / .npz of images (with train/ and val/ sub-folders, used the same way; otherwise a fixed random half of it
gives the floor and the other half is the reference). Features of named datasets are cached in --cache-dir.
Options are checked before any feature is computed (a bad value or path: one line on stderr, exit code 2); --json
is written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from .. import checkpoint
from ..cli import (ArgumentParser, add_dataclass_args, atomic_write, check_input_path, check_output_path,
                   dataclass_from_args, resolve_device, run)
from ..data import DATASET_NAMES, SPLITS, load_dataset
from .inception import INSTALL_HINT, inception_available
from .samples import EvalConfig, evaluate_samples, format_rows, load_images
from .tokenizer import TokenizerEvalConfig

PROG = "python -m nvg.eval"


def _h(text: str, **kw) -> dict:
    return {"help": text, **kw}


def _check_json(path: str | None) -> None:
    if path is not None and not path.lower().endswith(".json"):
        raise ValueError(f"--json {path!r} must end with .json")


@dataclass
class SamplesCommand:
    """`python -m nvg.eval`'s own options (the evaluation options are EvalConfig's)."""

    samples: str = field(metadata=_h(".npz (images [N,H,W,3] uint8, optional labels) or a folder of images"))
    device: str = field(default="auto", metadata=_h("auto (cuda when available), cpu, cuda, cuda:N"))
    json: str | None = field(default=None, metadata=_h("also write the results to this JSON file"))

    def __post_init__(self):
        _check_json(self.json)
        self.device = resolve_device(self.device)


@dataclass
class TokenizerCommand:
    """`python -m nvg.eval tokenizer`'s own options (the evaluation options are TokenizerEvalConfig's)."""

    ckpt: str = field(metadata=_h("run directory (uses its latest checkpoint) or checkpoint directory"))
    raw: bool = field(default=False, metadata=_h("use the raw weights (default: EMA when kept)"))
    dataset: str = field(default="fashion-mnist", metadata=_h(f"one of {DATASET_NAMES} or a class folder"))
    split: str = field(default="val", metadata=_h("dataset split", choices=SPLITS))
    device: str = field(default="auto", metadata=_h("auto (cuda when available), cpu, cuda, cuda:N"))
    json: str | None = field(default=None, metadata=_h("also write the results to this JSON file"))

    def __post_init__(self):
        _check_json(self.json)
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}: expected one of {SPLITS}")
        self.device = resolve_device(self.device)


def _parser(prog: str, description: str) -> ArgumentParser:
    return ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def _check_fid(fid: bool) -> None:
    if fid and not inception_available():
        raise FileNotFoundError(f"--fid needs the Inception weights: {INSTALL_HINT}")


def _write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def eval_samples(argv: list[str]):
    p = _parser(PROG, __doc__)
    add_dataclass_args(p, SamplesCommand)
    add_dataclass_args(p, EvalConfig, group="evaluation (nvg.eval.samples.EvalConfig)")
    ns = p.parse_args(argv)
    cmd, cfg = dataclass_from_args(SamplesCommand, ns), dataclass_from_args(EvalConfig, ns)
    _check_fid(cfg.fid)
    check_input_path(cmd.samples, "samples (.npz or folder)")
    if cmd.json:
        check_output_path(cmd.json, (".json",), "--json")
    images, labels = load_images(cmd.samples)
    opts = {**cfg.__dict__, "classes": list(cfg.classes) if cfg.classes else None}
    res = evaluate_samples(images, labels, device=cmd.device, **opts)
    print(f"samples {cmd.samples} against {cfg.reference}\n\n{format_rows(res)}")
    return cmd, res


def eval_tokenizer(argv: list[str]):
    from ..tokenizer import TokenizerConfig
    from .tokenizer import evaluate_tokenizer, format_tokenizer, load_tokenizer_checkpoint

    p = _parser(f"{PROG} tokenizer", "Evaluate a tokenizer checkpoint: PSNR, SSIM, rFD-proxy (rFID with --fid) and "
                "codebook usage per stage")
    add_dataclass_args(p, TokenizerCommand)
    add_dataclass_args(p, TokenizerEvalConfig, group="evaluation (nvg.eval.tokenizer.TokenizerEvalConfig)")
    ns = p.parse_args(argv)
    cmd, cfg = dataclass_from_args(TokenizerCommand, ns), dataclass_from_args(TokenizerEvalConfig, ns)
    _check_fid(cfg.fid)
    check_input_path(cmd.ckpt, "tokenizer checkpoint")
    if cmd.dataset not in DATASET_NAMES:
        check_input_path(cmd.dataset, "dataset folder", "dir")
    if cmd.json:
        check_output_path(cmd.json, (".json",), "--json")
    ck = checkpoint.open_checkpoint(cmd.ckpt, "tokenizer")
    try:
        image_size = TokenizerConfig.from_dict(ck.config["model"]).image_size
    except (KeyError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{ck.path}: config.json has no valid tokenizer model ({e})") from None
    ds = load_dataset(cmd.dataset, cmd.split, image_size)
    if cfg.n > len(ds):
        raise ValueError(f"--n {cfg.n} is more than the {len(ds)} images of {cmd.dataset} {cmd.split}")
    tok = load_tokenizer_checkpoint(str(ck.path), cmd.raw, cmd.device)
    res = evaluate_tokenizer(tok, ds, cfg.n, cfg.batch_size, cfg.fid, cmd.device)
    print(f"tokenizer {cmd.ckpt} on {cmd.dataset} {cmd.split}\n\n{format_tokenizer(res)}")
    return cmd, res


def main(argv: list[str] | None = None):
    """Run `python -m nvg.eval [tokenizer] ...`; returns the results (rows or dict). Expected errors raise
    (ValueError, FileNotFoundError, ...): `run` turns them into one line and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd, res = eval_tokenizer(argv[1:]) if argv[:1] == ["tokenizer"] else eval_samples(argv)
    if cmd.json:
        _write_json(cmd.json, res)
    return res


if __name__ == "__main__":
    run(main, PROG)
