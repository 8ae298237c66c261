"""A trained generator together with the tokenizer it was trained on.

A generator checkpoint records its tokenizer by content hash and by path (absolute, and relative to the generator's
run directory, so that a run folder moved as a whole still loads). Loading refuses a tokenizer whose weights differ
from the recorded ones: a generator sampled through another tokenizer draws noise.
"""
from __future__ import annotations

import os
from pathlib import Path

from .. import checkpoint
from ..model import GeneratorConfig, NVGGenerator
from ..tokenizer import Tokenizer, TokenizerConfig


def load_tokenizer(path: str | os.PathLike, device="cpu", ema: bool | None = None) -> tuple[Tokenizer, dict]:
    """(frozen tokenizer, its reference {"path", "hash"}) from a run or checkpoint directory (EMA weights when kept)."""
    tok, ckpt = checkpoint.load_model(path, "tokenizer", lambda m: Tokenizer(TokenizerConfig.from_dict(m)), ema, device)
    ref = {"path": str(ckpt.path.resolve()), "hash": checkpoint.content_hash(tok.state_dict())}
    return tok.requires_grad_(False), ref


def tokenizer_reference(ref: dict, run_dir: str | os.PathLike) -> dict:
    """The reference a generator run stores: its tokenizer's absolute path, path relative to the run dir, hash."""
    rel = os.path.relpath(ref["path"], Path(run_dir).resolve())
    return {**ref, "relative": rel}


def _candidates(ref: dict | str, gen_ckpt: Path) -> list[Path]:
    if isinstance(ref, str):  # older checkpoints: a path only
        return [Path(ref)]
    out = []
    if ref.get("relative"):
        out.append(gen_ckpt.parent / ref["relative"])
    out.append(Path(ref["path"]))
    for p in list(out):  # a pruned tokenizer checkpoint: any checkpoint of its run with the same weights
        out += [q for q in reversed(checkpoint.checkpoints(p.parent)) if q not in out]
    return out


def tokenizer_of(gen_ckpt: checkpoint.Checkpoint, device="cpu") -> Tokenizer:
    """The tokenizer a generator checkpoint was trained on (checked by content hash)."""
    ref = gen_ckpt.config.get("tokenizer")
    if ref is None:
        raise checkpoint.CheckpointError(f"{gen_ckpt.path}: the checkpoint names no tokenizer")
    want = ref.get("hash") if isinstance(ref, dict) else None
    seen = []
    for cand in _candidates(ref, gen_ckpt.path):
        if not cand.exists():
            continue
        tok, got = load_tokenizer(cand, device)
        if want is None or got["hash"] == want:
            return tok
        seen.append(f"{cand} (hash {got['hash']})")
    where = ref["path"] if isinstance(ref, dict) else ref
    if seen:
        raise checkpoint.CheckpointError(f"{gen_ckpt.path} was trained on tokenizer {where} with hash {want}, but the "
                                         f"tokenizer found differs: {'; '.join(seen)}")
    raise checkpoint.CheckpointError(f"the tokenizer of {gen_ckpt.path} is not at {where} (nor beside the run)")


def load_generator(path: str | os.PathLike, ema: bool | None = None, device="cpu"
                   ) -> tuple[NVGGenerator, Tokenizer, dict]:
    """(generator in eval mode, its frozen tokenizer, the checkpoint's config) from a run or checkpoint directory."""
    model, ckpt = checkpoint.load_model(path, "generator", lambda m: NVGGenerator(GeneratorConfig(**m)), ema, device)
    return model, tokenizer_of(ckpt, device), ckpt.config
