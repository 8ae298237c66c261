"""Loading VAR checkpoints: the released ones (`vae_ch160v4096z32.pth`, `var_d{16,20,24,30}.pth`) and our own runs.

The state_dicts keep the released key names, so loading is a strict `load_state_dict` after checking every key
and shape ourselves (nvg.checkpoint): a missing, unexpected or wrong-shaped key raises an error that names it (torch's own
message lists every mismatch of a large model in one long line). The configuration is read from the shapes, so a
narrower tokenizer or a shallower transformer of the same layout loads the same way.
"""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor

from nvg import checkpoint

from .model import VAR, VARConfig
from .vqvae import VQVAE, VQVAEConfig

StateDict = dict[str, Tensor]


def read_state_dict(source: str | os.PathLike | StateDict) -> StateDict:
    """A state_dict from a `.pth` file (tensors only, loaded on the CPU) or an in-memory dict."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"checkpoint {os.fspath(source)!r} does not exist")
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, dict) or not all(isinstance(v, Tensor) for v in source.values()):
        raise ValueError("expected a state_dict: a dict of parameter name -> tensor")
    return source


def _shape(state_dict: StateDict, key: str, what: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"{what}: missing key {key!r}, needed to read the configuration")
    return tuple(state_dict[key].shape)


def vqvae_config_from_state_dict(state_dict: StateDict, patch_nums: tuple[int, ...] | None = None) -> VQVAEConfig:
    """Reads width, levels, blocks, codebook and phi count from the shapes; patch_nums cannot be read (only their
    count, from `quantize.ema_vocab_hit_SV`) and defaults to the released 10 scales."""
    what = "VQVAE checkpoint"
    channels = _shape(state_dict, "encoder.conv_in.weight", what)[0]
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    multipliers = tuple(_shape(state_dict, f"encoder.down.{i}.block.0.conv1.weight", what)[0] // channels
                        for i in levels)
    num_res_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.down.0.block.")})
    vocab_size, latent_channels = _shape(state_dict, "quantize.embedding.weight", what)
    phi_count = len({k for k in state_dict if re.match(r"quantize\.quant_resi\.qresi_ls\.\d+\.weight$", k)})
    num_scales = _shape(state_dict, "quantize.ema_vocab_hit_SV", what)[0]
    patch_nums = tuple(patch_nums or VQVAEConfig.patch_nums)
    if len(patch_nums) != num_scales:
        raise ValueError(f"{what}: it has {num_scales} scales, patch_nums {patch_nums} has {len(patch_nums)}")
    return VQVAEConfig(channels=channels, channel_multipliers=multipliers, num_res_blocks=num_res_blocks,
                       vocab_size=vocab_size, latent_channels=latent_channels, patch_nums=patch_nums,
                       phi_count=phi_count)


def var_config_from_state_dict(state_dict: StateDict, patch_nums: tuple[int, ...] | None = None,
                               **overrides) -> VARConfig:
    """Reads depth, width, heads, classes, vocabulary and code width from the shapes."""
    what = "VAR checkpoint"
    depth = len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    width = _shape(state_dict, "pos_start", what)[2]
    num_heads = _shape(state_dict, "blocks.0.attn.scale_mul_1H11", what)[1]
    num_classes = _shape(state_dict, "class_emb.weight", what)[0] - 1
    vocab_size = _shape(state_dict, "head.weight", what)[0]
    latent_channels = _shape(state_dict, "word_embed.weight", what)[1]
    hidden = _shape(state_dict, "blocks.0.ffn.fc1.weight", what)[0]
    patch_nums = tuple(patch_nums or VARConfig.patch_nums)
    seq_len = _shape(state_dict, "pos_1LC", what)[1]
    if sum(pn * pn for pn in patch_nums) != seq_len:
        raise ValueError(f"{what}: pos_1LC has {seq_len} positions, patch_nums {patch_nums} give "
                         f"{sum(pn * pn for pn in patch_nums)}")
    return VARConfig(depth=depth, width=width, num_heads=num_heads, mlp_ratio=hidden / width,
                     num_classes=num_classes, vocab_size=vocab_size, latent_channels=latent_channels,
                     patch_nums=patch_nums, **overrides)


def load_vqvae(source: str | os.PathLike | StateDict, config: VQVAEConfig | None = None, ema: bool | None = None,
               device="cpu") -> VQVAE:
    """A VQVAE in eval mode from the released `.pth` (configuration read from it unless given) or from a run or
    checkpoint directory of `python -m nvg.train var` (EMA weights when kept, unless ema=False)."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        return checkpoint.load_model(source, "var-tokenizer", lambda m: VQVAE(VQVAEConfig(**m)), ema, device)[0]
    state_dict = read_state_dict(source)
    model = VQVAE(config or vqvae_config_from_state_dict(state_dict))
    return checkpoint.load_strict(model, state_dict, "VQVAE checkpoint").to(device).eval()


MASK_KEY = "attn_bias_for_masking"  # released buffer derived from the scales; checked and dropped on load


def load_var(source: str | os.PathLike | StateDict, config: VARConfig | None = None, ema: bool | None = None,
             device="cpu") -> VAR:
    """A VAR transformer in eval mode from the released `.pth` (configuration read from it unless given; with the
    additive mask `attn_bias_for_masking`, which must match the scales), a state dict without that mask, or a run or
    checkpoint directory of `python -m nvg.train var` (EMA weights when kept, unless ema=False)."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        return checkpoint.load_model(source, "var", lambda m: VAR(VARConfig(**m)), ema, device)[0]
    state_dict = dict(read_state_dict(source))
    model = VAR(config or var_config_from_state_dict(state_dict))
    if MASK_KEY in state_dict:
        mask = state_dict.pop(MASK_KEY)
        expected = model.additive_mask()
        if tuple(mask.shape) != tuple(expected.shape):
            raise ValueError(f"VAR checkpoint: key {MASK_KEY!r} has shape {tuple(mask.shape)}, the model expects "
                             f"{tuple(expected.shape)}")
        if not torch.equal(mask.float(), expected.float()):
            raise ValueError(f"VAR checkpoint: key {MASK_KEY!r} is not the block-causal mask of the scales "
                             f"{model.config.patch_nums}")
    return checkpoint.load_strict(model, state_dict, "VAR checkpoint").to(device).eval()


def official_var_state_dict(model: VAR) -> StateDict:
    """The model's weights in the released layout (adds `attn_bias_for_masking`), e.g. to run the released code."""
    state_dict = dict(model.state_dict())
    state_dict[MASK_KEY] = model.additive_mask()
    return state_dict
