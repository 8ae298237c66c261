"""Resume / checkpoint plumbing shared by the two VAR training stages (tokenizer and transformer).

Everything goes through nvg.trainer (atomic checkpoint directories, EMA, resumable batch order, RNG state), the same
machinery as NVG's own training scripts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from nvg.train import common as T


class RunState:
    """Model + optimizers + EMA of one stage, saved to / restored from `out_dir` checkpoints of kind `kind`."""

    def __init__(self, out_dir: Path, kind: str, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                 ema: T.EMA, config: dict, dist: T.Dist, extra_modules: dict[str, nn.Module] | None = None):
        self.out_dir, self.kind, self.model, self.optimizers, self.ema = out_dir, kind, model, optimizers, ema
        self.config = json.loads(json.dumps(config))  # as it reads back from config.json (tuples -> lists)
        self.dist, self.extra_modules = dist, extra_modules or {}
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    def resume(self, enabled: bool, seed: int) -> None:
        """Load the newest checkpoint of out_dir when `enabled` (checking its kind and model configuration),
        otherwise seed this rank's RNG."""
        ckpt = T.latest_checkpoint(self.out_dir) if enabled else None
        if enabled and ckpt is None and self.dist.is_main:
            print(f"--resume: no checkpoint in {self.out_dir}, starting from scratch")
        if ckpt is None:
            T.seed_everything(seed + 1000 * self.dist.rank)
            return
        saved = T.read_config(ckpt)
        if saved.get("kind") != self.kind:
            raise ValueError(f"{ckpt} is a {saved.get('kind')!r} checkpoint, not a {self.kind!r} one")
        T.check_same_config(saved["model"], self.config["model"], f"{self.kind} configuration")
        self.model.load_state_dict(T.load_weights(ckpt))
        self.ema.load_state_dict(T.load_weights(ckpt, ema=True))
        state = T.load_state(ckpt)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
        for name, module in self.extra_modules.items():
            module.load_state_dict(state[name])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        T.set_rng_state(state["rng"][self.dist.rank] if isinstance(state["rng"], list) else state["rng"])

    def save(self, step: int, epoch: int, next_batch: int) -> None:
        rng = T.rng_state()
        if self.dist.world_size > 1:  # every rank's RNG (all_gather_object keeps the ranks in lockstep)
            rngs = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rngs, rng)
            rng = rngs
        if not self.dist.is_main:
            return
        state = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        state.update({name: module.state_dict() for name, module in self.extra_modules.items()})
        state.update(step=step, epoch=epoch, batch_in_epoch=next_batch, rng=rng)
        T.save_checkpoint(self.out_dir, step, self.model, self.config, state, self.ema)


def adamw_groups(model: nn.Module, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, embeddings of positions/levels, per-head scales."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name for k in no_decay_names) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
