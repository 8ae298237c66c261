"""Load official NVG autoencoder weights (github.com/Yikai-Wang/nvg `ae.ckpt`, config vq-f16-d32) into `Tokenizer`.

The official state dict has the same key names as ours (encoder.*, decoder.*, quantize.embedding.weight,
quantize.quant_resi.{i}.*). It also carries keys we do not use: `total_visited_codes` (usage counters),
`loss.*` (LPIPS and DINO-discriminator weights) and, with `use_ema`, an `ema_model.*` copy of everything.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .tokenizer import Tokenizer, TokenizerConfig

IGNORED_PREFIXES = ("loss.", "total_visited_codes")


def official_tokenizer_state_dict(checkpoint: Mapping, ema: bool = False) -> dict[str, Tensor]:
    """Extract our tokenizer's state dict from an official checkpoint or state dict.

    Args:
        checkpoint: the loaded `ae.ckpt` (a dict with "state_dict") or a bare state dict.
        ema: take the `ema_model.*` weights instead of the raw ones (the official generator uses the raw ones).
    """
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a checkpoint dict or a state dict, got {type(checkpoint).__name__}")
    out = {}
    for k, v in sd.items():
        if ema != k.startswith("ema_model."):
            continue
        k = k.removeprefix("ema_model.")
        if k.startswith(IGNORED_PREFIXES):
            continue
        out[k] = v
    if ema and not out:
        raise KeyError("ema=True but the checkpoint has no ema_model.* weights")
    return out


def load_official_tokenizer(checkpoint: Mapping, config: TokenizerConfig | str = "nvg-ae-f16",
                            ema: bool = False) -> Tokenizer:
    """Build a Tokenizer from official weights; raises naming the first missing, unexpected or wrong-shaped key.

    Args:
        checkpoint: official `ae.ckpt` contents (torch.load(..., map_location="cpu")) or its state dict.
        config: the architecture the weights belong to (default: the official 256 px, 16x16 configuration).
        ema: load the EMA copy (`ema_model.*`) instead of the raw weights.
    """
    sd = official_tokenizer_state_dict(checkpoint, ema=ema)
    with torch.device("meta"):
        expected = Tokenizer(config).state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise KeyError(f"official checkpoint lacks {len(missing)} tokenizer keys, e.g. {missing[0]!r} "
                       f"(is it an NVG autoencoder of configuration {config!r}?)")
    if unexpected:
        raise KeyError(f"official checkpoint has {len(unexpected)} keys this tokenizer does not know, "
                       f"e.g. {unexpected[0]!r}")
    for k, ref in expected.items():
        if tuple(sd[k].shape) != tuple(ref.shape):
            raise ValueError(f"key {k!r}: checkpoint shape {tuple(sd[k].shape)} != expected {tuple(ref.shape)} "
                             f"for configuration {config!r}")
    tok = Tokenizer(config)
    tok.load_state_dict({k: v.float() for k, v in sd.items()})
    return tok.eval()
