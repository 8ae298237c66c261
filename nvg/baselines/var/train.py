"""Train the VAR baseline: `python -m nvg.train var [--stage tokenizer|transformer|both] [--options]`.

    python -m nvg.train var --stage both --out-dir runs/var            # tiny tokenizer, then the tiny transformer
    python -m nvg.train var --stage transformer --vae-checkpoint vae_ch160v4096z32.pth --var-preset var-d16 ...
    torchrun --nproc_per_node 2 -m nvg.train var ...                   # DDP (gloo on CPU, nccl on GPU)

Stage 1 (tokenizer) trains the multi-scale VQVAE (train_tokenizer.py). Stage 2 (transformer) trains VAR on the
frozen tokenizer's token maps, as released (Tian et al. 2024, trainer.py): tokens are extracted from each batch
on the fly, the input is the teacher-forcing sequence `indices_to_var_input`, the loss is the mean cross-entropy
over all L positions (uniform weights), labels are dropped to the null class with probability 0.1, AdamW
(0.9, 0.95) with weight decay 0.05 on matrices only, gradient clip 2, and the released schedule shape (linear
warm-up over 2% of the steps, flat, linear decay to 0.1 from 7%: "wsd" in nvg.trainer). Both stages run on nvg.train.loop
(atomic checkpoints, exact resume, EMA, DDP, time cap, signals, non-finite steps). At the end the EMA transformer samples `eval_samples` images, saved
as samples.npz (`python -m nvg.eval --samples ...` scores them) and scored with the FD-proxy when `--fd-proxy`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nvg import checkpoint
from nvg.train import common as T
from nvg.train.loop import Loop, LoopConfig

from .convert import load_vqvae
from .model import VAR, VAR_PRESETS, VARConfig
from .sample import VARSampleConfig, check_pair
from .sampler import VARSampler
from .train_tokenizer import train_tokenizer
from .vqvae import VQVAE, VQVAE_PRESETS

NO_DECAY = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul")  # released `nowd_keys` that are matrices


@dataclass
class TrainConfig(LoopConfig):
    stage: str = "both"  # "tokenizer", "transformer" or "both" (tokenizer, then the transformer on it)
    dataset: str = "fashion-mnist"  # nvg.data.load_dataset name or an ImageNet-layout folder
    out_dir: str = "runs/var"  # stages write out_dir/tokenizer and out_dir/transformer
    vae_preset: str = "var-vae-tiny"  # nvg.baselines.var.vqvae.VQVAE_PRESETS
    var_preset: str = "var-tiny"  # nvg.baselines.var.model.VAR_PRESETS
    vae_checkpoint: str | None = None  # transformer stage: tokenizer run dir, ckpt dir or released .pth
    tokenizer_ema: bool = True  # use the tokenizer's EMA weights (our checkpoints)
    tokenizer_steps: int = 1500
    tokenizer_lr: float = 4e-4
    vq_weight: float = 1.0
    disc: str = "patch"  # "patch" (PatchGAN as NVG's tokenizer) or "none"
    disc_weight: float = 0.1
    disc_channels: int = 32
    steps: int = 3000  # transformer steps
    lr: float = 3e-4  # transformer peak LR (released: 1e-4 per 256 images)
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # default: 2% of the steps
    label_smoothing: float = 0.0
    grad_clip: float = 2.0
    ema_decay: float = 0.999  # 0 = no averaging (no EMA copy; the checkpoints hold the raw weights only)
    cfg_scale: float = 1.5  # sampling: guidance at the last scale (released)
    top_k: int = 0  # sampling filters (0 / 1.0 = off); released FID settings at 256 px: 900 / 0.96
    top_p: float = 1.0
    eval_samples: int = 1000  # samples drawn at the end (0 = none), classes in turn
    fd_proxy: bool = True  # score the samples with nvg.eval's FD-proxy
    eval_images: int = 512  # tokenizer stage: validation images for PSNR / usage

    def __post_init__(self):
        super().__post_init__()
        T.check_ema_decay(self.ema_decay)
        if self.stage not in ("tokenizer", "transformer", "both"):
            raise ValueError(f"--stage must be 'tokenizer', 'transformer' or 'both', got {self.stage!r}")
        if self.disc not in ("patch", "none"):
            raise ValueError(f"--disc must be 'patch' or 'none', got {self.disc!r}")
        if self.var_preset not in VAR_PRESETS:
            raise ValueError(f"unknown VAR preset {self.var_preset!r}; known: {sorted(VAR_PRESETS)}")
        if self.vae_preset not in VQVAE_PRESETS:
            raise ValueError(f"unknown VQVAE preset {self.vae_preset!r}; known: {sorted(VQVAE_PRESETS)}")
        if self.tokenizer_steps < 1 or self.eval_samples < 0:
            raise ValueError(f"--tokenizer-steps must be >= 1 and --eval-samples >= 0, got {self.tokenizer_steps} "
                             f"and {self.eval_samples}")
        self.sample_config()  # top-k / top-p / cfg checked before any work

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sample_config(self) -> VARSampleConfig:
        return VARSampleConfig(content_cfg=(1.0, 1.0 + self.cfg_scale), top_k=self.top_k, top_p=self.top_p)


def adamw_groups(model: nn.Module, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, embeddings of positions/levels, per-head scales."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name for k in no_decay_names) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def draw_samples(var: VAR, vae: VQVAE, n: int, cfg: TrainConfig, batch_size: int = 100) -> tuple[torch.Tensor, ...]:
    """n images (uint8 (n, 3, H, W)) and their labels, classes 0..num_classes-1 in turn, seeds cfg.seed + batch."""
    var.eval()
    sampler = VARSampler(var, vae)
    labels = torch.arange(n) % var.config.num_classes
    images = []
    for i, s in enumerate(range(0, n, batch_size)):
        x = sampler.sample(labels[s : s + batch_size], cfg.sample_config(), seed=cfg.seed + i)
        images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
    var.train()
    return torch.cat(images), labels


class VARTrainer:
    """The VAR transformer on a frozen tokenizer's token maps, as released (teacher forcing, uniform CE)."""

    kind = "var"

    def __init__(self, cfg: TrainConfig, loop: Loop, vae: VQVAE, train_set):
        self.cfg, self.loop, self.vae, self.train_set = cfg, loop, vae, train_set
        self.dev = dev = loop.dist.device
        self.var_config = VARConfig(**VAR_PRESETS[cfg.var_preset])
        T.seed_everything(cfg.seed)  # same initial weights on every rank
        self.model = VAR(self.var_config).to(dev)
        check_pair(self.model, vae.quantize)
        self.opt = torch.optim.AdamW(adamw_groups(self.model, cfg.weight_decay, NO_DECAY), lr=cfg.lr,
                                     betas=(0.9, 0.95))
        self.ema = T.make_ema(self.model, cfg.ema_decay)  # None at --ema-decay 0
        self.net = DDP(self.model) if loop.dist.world_size > 1 else self.model
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 50
        self.vae_hash = checkpoint.content_hash(vae.state_dict())

    def config(self) -> dict:
        return {"model": dataclasses.asdict(self.model.config), "tokenizer": dataclasses.asdict(self.vae.config),
                "tokenizer_hash": self.vae_hash, "train": self.cfg.as_dict()}

    def options(self) -> dict:
        return {"model": dataclasses.asdict(self.model.config), "tokenizer_hash": self.vae_hash}

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])

    def step(self, idx: list[int], step: int, epoch: int) -> dict:
        cfg, dev, var = self.cfg, self.dev, self.model
        x, labels = T.collate(self.train_set, idx)
        x, labels = x.to(dev, non_blocking=True), labels.to(dev)
        with torch.no_grad():  # tokens of this batch, in fp32 outside autocast (as released)
            idx_list = self.vae.encode(x)
            x_BLCv = self.vae.quantize.indices_to_var_input(idx_list)
            target_BL = torch.cat(idx_list, 1)
        T.set_lr(self.opt, cfg.lr * T.lr_factor(self.loop.schedule_step(step), cfg.steps, "wsd", self.warmup,
                                                decay_start=0.07, final_ratio=0.1))
        with T.autocast(dev, cfg.amp):
            logits_BLV = self.net(labels, x_BLCv)
        loss = F.cross_entropy(logits_BLV.flatten(0, 1).float(), target_BL.flatten(),
                               label_smoothing=cfg.label_smoothing)
        if self.loop.update(self.opt, loss, var.parameters(), cfg.grad_clip, "VAR loss") and self.ema is not None:
            self.ema.update(var)
        last = var.begin_ends[-1][0]  # accuracy on the last scale (VAR's "tail")
        tail_acc = (logits_BLV[:, last:].detach().argmax(-1) == target_BL[:, last:]).float().mean()
        return {"loss": loss.detach(), "tail_acc": tail_acc}

    def images(self, step: int, tag: str) -> None:
        with T.ema_weights(self.ema, self.model):
            grid, _ = draw_samples(self.model, self.vae, self.var_config.num_classes, self.cfg)  # one per class
        name = "samples_ema.png" if self.ema is not None else "samples.png"
        T.save_image_grid(grid.float() / 127.5 - 1, self.loop.run_dir / name,
                          nrow=self.var_config.num_classes, scale=2)

    def finish(self, result: dict) -> dict:
        cfg, out = self.cfg, self.loop.run_dir
        if cfg.eval_samples > 0:
            with T.ema_weights(self.ema, self.model):
                images, labels = draw_samples(self.model, self.vae, cfg.eval_samples, cfg)
            tmp = out / ".samples.tmp.npz"
            np.savez(tmp, images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
            tmp.replace(out / "samples.npz")
            if cfg.fd_proxy:
                from nvg.eval import evaluate_samples, format_rows

                result["eval"] = evaluate_samples(images, labels, reference=cfg.dataset, device=self.dev)
                print(format_rows(result["eval"]))
        checkpoint.atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
        return result


def train_transformer(cfg: TrainConfig, loop: Loop, vae_path: str) -> dict:
    from nvg.data import load_dataset

    vae = load_vqvae(vae_path, ema=None if cfg.tokenizer_ema else False, device=loop.dist.device)
    vae.requires_grad_(False)
    train_set = load_dataset(cfg.dataset, "train", vae.config.image_size)
    trainer = VARTrainer(cfg, loop, vae, train_set)
    num_classes = trainer.var_config.num_classes
    labels = getattr(train_set, "labels", None)
    if labels is not None and len(labels) and int(torch.as_tensor(labels).max()) >= num_classes:
        raise ValueError(f"dataset label {int(torch.as_tensor(labels).max())} >= num_classes {num_classes} of "
                         f"{cfg.var_preset}")
    trainer.model.train()
    result = loop.run(trainer, len(train_set))
    if loop.dist.is_main and not loop.interrupted:
        result = trainer.finish(result)
    return result


def main(cfg: TrainConfig) -> dict:
    out = Path(cfg.out_dir)
    stages = [s for s in ("tokenizer", "transformer") if cfg.stage in (s, "both")]
    loops, d = {}, None  # a directory holding another run is refused before any work
    if "tokenizer" in stages:
        loops["tokenizer"] = Loop.start(dataclasses.replace(cfg, steps=cfg.tokenizer_steps), out / "tokenizer",
                                        "var tokenizer")
        d = loops["tokenizer"].dist
    if "transformer" in stages:
        loops["transformer"] = Loop.start(cfg, out / "transformer", "var", d)
    results = {}
    if "tokenizer" in stages:
        results["tokenizer"] = train_tokenizer(cfg, loops["tokenizer"])
        if loops["tokenizer"].interrupted:
            T.destroy_distributed()
            return results
    if "transformer" in stages:
        vae_path = cfg.vae_checkpoint or str(out / "tokenizer")
        results["transformer"] = train_transformer(cfg, loops["transformer"], vae_path)
    T.destroy_distributed()
    return results
