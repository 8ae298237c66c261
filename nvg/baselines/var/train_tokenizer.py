"""Stage 1 of `python -m nvg.train var`: train VAR's multi-scale VQVAE.

The released VAR repository has no tokenizer training code (its checkpoint was trained with VQGAN-style perceptual
and adversarial losses on OpenImages). This stage uses the losses of NVG's tokenizer script so that both tokenizers
are trained alike: L1 + vq_weight * VQ loss (mean over scales, commitment beta 0.25) + disc_weight * non-saturating
loss of the same PatchGAN discriminator (hinge loss for it). No LPIPS (it needs downloaded weights).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nvg.train import common as T
from nvg.train.discriminator import PatchDiscriminator, generator_loss, hinge_d_loss
from nvg.eval.metrics import codebook_usage, psnr

from .train_common import RunState
from .vqvae import VQVAE, VQVAEConfig


@torch.no_grad()
def evaluate_tokenizer(vae: VQVAE, dataset, n: int, batch_size: int, device) -> dict:
    """PSNR of the token-path reconstructions and codebook usage (all scales) on the first n images."""
    vae.eval()
    n = min(n, len(dataset))
    scores, tokens = [], []
    for s in range(0, n, batch_size):
        x, _ = T.collate(dataset, list(range(s, min(n, s + batch_size))))
        x = x.to(device)
        idx = vae.encode(x)
        scores.append(psnr(vae.decode(idx), x))
        tokens.append(torch.cat(idx, 1).cpu())
    vae.train()
    return {"psnr": torch.cat(scores).mean().item(),
            "usage": codebook_usage(torch.cat(tokens), vae.config.vocab_size)["usage"], "images": n}


def train_tokenizer(cfg, dist: T.Dist, out: Path) -> dict:
    """Runs the tokenizer stage of `cfg` (nvg.baselines.var.train.TrainConfig) in `out`; returns its metrics."""
    from nvg.data import load_dataset

    dev = dist.device
    vae_config = VQVAEConfig.from_name(cfg.vae_preset)
    train_set = load_dataset(cfg.dataset, "train", vae_config.image_size)
    val_set = load_dataset(cfg.dataset, "val", vae_config.image_size)
    T.seed_everything(cfg.seed)  # same initial weights on every rank
    vae = VQVAE(vae_config).to(dev)
    disc = PatchDiscriminator(3, cfg.disc_channels).to(dev) if cfg.disc == "patch" else None
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.tokenizer_lr, betas=(0.9, 0.95), weight_decay=0.0)
    optimizers = {"optimizer": opt}
    if disc is not None:
        optimizers["disc_optimizer"] = torch.optim.AdamW(disc.parameters(), lr=cfg.tokenizer_lr, betas=(0.9, 0.95),
                                                         weight_decay=5e-4)
    ema = T.EMA(vae, cfg.ema_decay)
    config = {"kind": "var-tokenizer", "model": vae.config_dict(), "train": cfg.as_dict()}
    run = RunState(out, "var-tokenizer", vae, optimizers, ema, config, dist, {"disc": disc} if disc else None)
    run.resume(cfg.resume, cfg.seed)
    net = DDP(vae) if dist.world_size > 1 else vae
    net_d = DDP(disc) if (disc is not None and dist.world_size > 1) else disc
    batches = T.ResumableBatches(len(train_set), cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
    fixed_x, _ = T.collate(val_set, list(range(min(16, len(val_set)))))
    fixed_x = fixed_x.to(dev)
    step, start_step, t0, stop_reason = run.step, run.step, time.time(), None
    bar = T.progress(cfg.tokenizer_steps, step, dist.is_main, desc="var tokenizer")
    vae.train()
    for epoch, b, idx in batches.iterate(run.epoch, run.batch_in_epoch):
        if step >= cfg.tokenizer_steps:
            break
        x, _ = T.collate(train_set, idx)
        x = x.to(dev, non_blocking=True)
        lr = cfg.tokenizer_lr  # constant, as NVG's tokenizer script
        for o in optimizers.values():
            T.set_lr(o, lr)
        use_disc = disc is not None and cfg.disc_weight > 0
        with T.autocast(dev, cfg.amp):
            rec, vq_loss, hits_SV = net(x)
            rec = rec.float()
            l1 = (rec - x).abs().mean()
            loss = l1 + cfg.vq_weight * vq_loss
            if use_disc:
                disc.requires_grad_(False)  # the generator loss must not touch D's gradients (or DDP hooks)
                loss = loss + cfg.disc_weight * generator_loss(disc(rec))
                disc.requires_grad_(True)
        T.optimizer_step(opt, loss, vae.parameters(), cfg.grad_clip, step, "tokenizer loss")
        with torch.no_grad():  # per-scale usage record kept in the checkpoint (released buffer)
            vae.quantize.ema_vocab_hit_SV.mul_(0.99).add_(T.all_reduce_mean(hits_SV), alpha=0.01)
        ema.update(vae)
        if use_disc:
            with T.autocast(dev, cfg.amp):
                d_loss = hinge_d_loss(*net_d(torch.cat([x, rec.detach()])).float().chunk(2))
            optimizers["disc_optimizer"].zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
            optimizers["disc_optimizer"].step()
        step += 1
        if dist.is_main and (step % cfg.log_every == 0 or step == cfg.tokenizer_steps):
            bar.set_postfix(loss=f"{loss.item():.4f}", l1=f"{l1.item():.4f}", vq=f"{vq_loss.item():.4f}",
                            refresh=False)
        bar.update(1)
        if cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes:
            stop_reason = f"time budget of {cfg.max_minutes} min reached"
        if cfg.stop_after is not None and step >= cfg.stop_after:
            stop_reason = f"stop_after={cfg.stop_after}"
        if dist.is_main and (step % cfg.image_every == 0 or step == cfg.tokenizer_steps or stop_reason):
            with torch.no_grad(), ema.applied(vae):
                vae.eval()
                T.save_image_grid(torch.cat([fixed_x, vae.decode(vae.encode(fixed_x))]),
                                  out / "recon_ema.png", nrow=len(fixed_x), scale=2)
                vae.train()
        if step % cfg.ckpt_every == 0 or step == cfg.tokenizer_steps or stop_reason:
            run.save(step, epoch, b + 1)
        if stop_reason:
            break
    bar.close()
    result = {"steps": step, "steps_this_run": step - start_step, "seconds": time.time() - t0,
              "stopped": stop_reason}
    if dist.is_main and not (stop_reason or "").startswith("stop_after"):
        with ema.applied(vae):
            result["val_ema"] = evaluate_tokenizer(vae, val_set, cfg.eval_images, 64, dev)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        print(f"var tokenizer: {step} steps, val PSNR (EMA) {result['val_ema']['psnr']:.2f} dB, "
              f"usage {result['val_ema']['usage']:.2f}; checkpoints in {out}")
    result["checkpoint"] = str(T.latest_checkpoint(out)) if dist.is_main else None
    return result
