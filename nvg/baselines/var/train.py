"""Train the VAR baseline: `python -m nvg.train var [--stage tokenizer|transformer|both] [--options]`.

    python -m nvg.train var --stage both --out-dir runs/var            # tiny tokenizer, then the tiny transformer
    python -m nvg.train var --stage transformer --vae-checkpoint vae_ch160v4096z32.pth --var-preset var-d16 ...
    torchrun --nproc_per_node 2 -m nvg.train var ...                   # DDP (gloo on CPU, nccl on GPU)

Stage 1 (tokenizer) trains the multi-scale VQVAE (train_tokenizer.py). Stage 2 (transformer) trains VAR on the
frozen tokenizer's token maps, as released (Tian et al. 2024, trainer.py): tokens are extracted from each batch
on the fly, the input is the teacher-forcing sequence `indices_to_var_input`, the loss is the mean cross-entropy
over all L positions (uniform weights), labels are dropped to the null class with probability 0.1, AdamW
(0.9, 0.95) with weight decay 0.05 on matrices only, gradient clip 2, and the released schedule shape (linear
warm-up over 2% of the steps, flat, linear decay to 0.1 from 7%: "wsd" in nvg.trainer). Both stages use nvg.trainer
(atomic checkpoints, exact resume, EMA, DDP). At the end the EMA transformer samples `eval_samples` images, saved
as samples.npz (`python -m nvg.eval --samples ...` scores them) and scored with the FD-proxy when `--fd-proxy`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nvg.train import common as T

from .convert import load_vqvae
from .model import VAR, VAR_PRESETS, VARConfig
from .sample import VARSampler, VARSampleConfig, check_pair
from .train_common import RunState, adamw_groups
from .train_tokenizer import train_tokenizer
from .vqvae import VQVAE, VQVAEConfig

NO_DECAY = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul")  # released `nowd_keys` that are matrices


@dataclass
class TrainConfig:
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
    batch_size: int = 32  # per process, both stages
    lr: float = 3e-4  # transformer peak LR (released: 1e-4 per 256 images)
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # default: 2% of the steps
    label_smoothing: float = 0.0
    grad_clip: float = 2.0
    ema_decay: float = 0.999
    cfg_scale: float = 1.5  # sampling: guidance at the last scale
    top_k: int = 0  # sampling filters (top_k 0 / top_p 1.0 = off); released FID settings at 256 px: 900 / 0.96
    top_p: float = 1.0
    eval_samples: int = 1000  # samples drawn at the end (0 = none), classes in turn
    fd_proxy: bool = True  # score the samples with nvg.eval's FD-proxy
    eval_images: int = 512  # tokenizer stage: validation images for PSNR / usage
    log_every: int = 25
    image_every: int = 500
    ckpt_every: int = 500
    seed: int = 0
    resume: bool = False
    device: str | None = None  # "cpu" / "cuda"; default cuda when available
    amp: bool = True  # bf16 autocast (GPU only)
    max_minutes: float | None = None  # per stage: stop (with a checkpoint) after this wall-clock time
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as if killed: resume tests

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _validate(cfg: TrainConfig) -> None:
    if cfg.stage not in ("tokenizer", "transformer", "both"):
        raise ValueError(f"--stage must be 'tokenizer', 'transformer' or 'both', got {cfg.stage!r}")
    if cfg.disc not in ("patch", "none"):
        raise ValueError(f"--disc must be 'patch' or 'none', got {cfg.disc!r}")
    if cfg.var_preset not in VAR_PRESETS:
        raise ValueError(f"unknown VAR preset {cfg.var_preset!r}; known: {sorted(VAR_PRESETS)}")
    if min(cfg.steps, cfg.tokenizer_steps, cfg.batch_size) < 1:
        raise ValueError("steps, tokenizer_steps and batch_size must be positive")


@torch.no_grad()
def draw_samples(var: VAR, vae: VQVAE, n: int, cfg: TrainConfig, batch_size: int = 100) -> tuple[torch.Tensor, ...]:
    """n images (uint8 (n, 3, H, W)) and their labels, classes 0..num_classes-1 in turn, seeds cfg.seed + batch."""
    var.eval()
    labels = torch.arange(n) % var.config.num_classes
    sampler = VARSampler(var, vae)
    settings = VARSampleConfig(content_cfg=(1.0, 1.0 + cfg.cfg_scale), top_k=cfg.top_k, top_p=cfg.top_p)
    images = []
    for i, s in enumerate(range(0, n, batch_size)):
        x = sampler.sample(labels[s : s + batch_size], settings, seed=cfg.seed + i)
        images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
    var.train()
    return torch.cat(images), labels


def train_transformer(cfg: TrainConfig, dist: T.Dist, out: Path, vae_path: str) -> dict:
    from nvg.data import load_dataset

    dev = dist.device
    vae = load_vqvae(vae_path, ema=None if cfg.tokenizer_ema else False, device=dev).requires_grad_(False)
    var_config = VARConfig.from_name(cfg.var_preset)
    train_set = load_dataset(cfg.dataset, "train", vae.config.image_size)
    T.seed_everything(cfg.seed)  # same initial weights on every rank
    var = VAR(var_config).to(dev)
    check_pair(var, vae.quantize)
    opt = torch.optim.AdamW(adamw_groups(var, cfg.weight_decay, NO_DECAY), lr=cfg.lr, betas=(0.9, 0.95))
    ema = T.EMA(var, cfg.ema_decay)
    config = {"kind": "var", "model": var.config_dict(), "tokenizer": vae.config_dict(), "train": cfg.as_dict()}
    run = RunState(out, "var", var, {"optimizer": opt}, ema, config, dist)
    run.resume(cfg.resume, cfg.seed)
    net = DDP(var) if dist.world_size > 1 else var
    batches = T.ResumableBatches(len(train_set), cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 50
    step, start_step, t0, stop_reason = run.step, run.step, time.time(), None
    bar = T.progress(cfg.steps, step, dist.is_main, desc="var")
    var.train()
    for epoch, b, idx in batches.iterate(run.epoch, run.batch_in_epoch):
        if step >= cfg.steps:
            break
        x, labels = T.collate(train_set, idx)
        x, labels = x.to(dev, non_blocking=True), labels.to(dev)
        if int(labels.max()) >= var_config.num_classes:
            raise ValueError(f"dataset label {int(labels.max())} >= num_classes {var_config.num_classes} of "
                             f"{cfg.var_preset}")
        with torch.no_grad():  # tokens of this batch, in fp32 outside autocast (as released)
            idx_list = vae.encode(x)
            x_BLCv = vae.quantize.indices_to_var_input(idx_list)
            target_BL = torch.cat(idx_list, 1)
        T.set_lr(opt, cfg.lr * T.lr_factor(step, cfg.steps, "wsd", warmup, decay_start=0.07, final_ratio=0.1))
        with T.autocast(dev, cfg.amp):
            logits_BLV = net(labels, x_BLCv)
        loss = F.cross_entropy(logits_BLV.flatten(0, 1).float(), target_BL.flatten(),
                               label_smoothing=cfg.label_smoothing)
        T.optimizer_step(opt, loss, var.parameters(), cfg.grad_clip, step, "VAR loss")
        ema.update(var)
        step += 1
        if dist.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            last = var.begin_ends[-1][0]  # accuracy on the last scale (VAR's "tail")
            acc = (logits_BLV[:, last:].argmax(-1) == target_BL[:, last:]).float().mean()
            bar.set_postfix(loss=f"{loss.item():.4f}", tail_acc=f"{acc.item():.3f}", refresh=False)
        bar.update(1)
        if cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes:
            stop_reason = f"time budget of {cfg.max_minutes} min reached"
        if cfg.stop_after is not None and step >= cfg.stop_after:
            stop_reason = f"stop_after={cfg.stop_after}"
        if dist.is_main and (step % cfg.image_every == 0 or step == cfg.steps or stop_reason):
            with ema.applied(var):
                grid, _ = draw_samples(var, vae, var_config.num_classes, cfg)  # one per class
            T.save_image_grid(grid.float() / 127.5 - 1, out / "samples_ema.png", nrow=var_config.num_classes, scale=2)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_reason:
            run.save(step, epoch, b + 1)
        if stop_reason:
            break
    bar.close()
    result = {"steps": step, "steps_this_run": step - start_step, "seconds": time.time() - t0,
              "stopped": stop_reason}
    if dist.is_main and cfg.eval_samples > 0 and not (stop_reason or "").startswith("stop_after"):
        with ema.applied(var):
            images, labels = draw_samples(var, vae, cfg.eval_samples, cfg)
        np.savez(out / "samples.npz", images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        if cfg.fd_proxy:
            from nvg.eval import evaluate_samples, format_rows

            result["eval"] = evaluate_samples(images, labels, reference=cfg.dataset, device=dev)
            print(format_rows(result["eval"]))
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    result["checkpoint"] = str(T.latest_checkpoint(out)) if dist.is_main else None
    return result


def main(cfg: TrainConfig) -> dict:
    _validate(cfg)
    dist = T.init_distributed(cfg.device)
    out = Path(cfg.out_dir)
    results = {}
    if cfg.stage in ("tokenizer", "both"):
        results["tokenizer"] = train_tokenizer(cfg, dist, out / "tokenizer")
        if (results["tokenizer"]["stopped"] or "").startswith("stop_after"):
            T.destroy_distributed()
            return results
        if dist.world_size > 1:  # rank 0 writes and evaluates the checkpoint the transformer stage loads
            torch.distributed.barrier()
    if cfg.stage in ("transformer", "both"):
        vae_path = cfg.vae_checkpoint or str(out / "tokenizer")
        results["transformer"] = train_transformer(cfg, dist, out / "transformer", vae_path)
    T.destroy_distributed()
    return results
