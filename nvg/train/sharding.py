"""FSDP2-aware checkpoint and EMA helpers of generator training (every function is also correct without FSDP).

Under FSDP2 (`fully_shard`) parameters, gradients and optimizer state are sharded across ranks; checkpoints still hold
full tensors (gathered with torch.distributed.checkpoint's state-dict API), so a run can resume with or without it
only in the same mode (the optimizer state layout differs). The EMA (decay > 0 only) is a full fp32 copy on every
rank; without it the sample grids gather the full weights when they are drawn.
"""

from __future__ import annotations

import torch

from . import common as T
from ..model import GeneratorConfig, NVGGenerator


def shard(model: NVGGenerator) -> None:
    """FSDP2: shard every transformer block, then the rest (embeddings, heads) at the root."""
    from torch.distributed.fsdp import fully_shard

    for block in list(model.content_blocks) + list(model.structure_blocks):
        fully_shard(block)
    fully_shard(model)


def _full(v):
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def full_weights(model: NVGGenerator, fsdp: bool) -> dict:
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, opt, fsdp: bool) -> dict:
    if not fsdp:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer(model, opt, state: dict, fsdp: bool) -> None:
    if not fsdp:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def load_full_weights(model: NVGGenerator, state_dict: dict) -> None:
    """Load a full (unsharded) state dict into a sharded model, strictly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))


@torch.no_grad()
def ema_update(ema: T.EMA, model: NVGGenerator) -> None:
    """EMA step; sharded parameters are gathered first (a collective: every rank calls it)."""
    for k, v in model.state_dict().items():
        if k in ema.shadow:
            ema.shadow[k].lerp_(_full(v).float(), 1 - ema.decay)


def plain_model(gcfg: GeneratorConfig, weights: dict, device) -> NVGGenerator:
    """A plain (unsharded) eval-mode generator holding `weights` (the EMA copy, or the raw weights), for sample
    grids."""
    m = NVGGenerator(gcfg).to(device)
    m.load_state_dict({**m.state_dict(), **{k: v.to(device) for k, v in weights.items()}})
    return m.eval()
