"""Stage 1 of `python -m nvg.train var`: train VAR's multi-scale VQVAE.

The released VAR repository has no tokenizer training code (its checkpoint was trained with VQGAN-style perceptual
and adversarial losses on OpenImages). This stage uses the losses of NVG's tokenizer script so that both tokenizers
are trained alike: L1 + vq_weight * VQ loss (mean over scales, commitment beta 0.25) + disc_weight * non-saturating
loss of the same PatchGAN discriminator (hinge loss for it). No LPIPS (it needs downloaded weights).
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nvg import checkpoint
from nvg.eval.metrics import codebook_usage, psnr
from nvg.train import common as T
from nvg.train.discriminator import PatchDiscriminator, generator_loss, hinge_d_loss
from nvg.train.loop import Loop

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


class VQVAETrainer:
    """VAR's multi-scale VQVAE with NVG's tokenizer losses (L1 + VQ + PatchGAN), on the shared loop."""

    kind = "var-tokenizer"

    def __init__(self, cfg, loop: Loop, train_set, val_set):
        self.cfg, self.loop, self.train_set, self.val_set = cfg, loop, train_set, val_set
        self.dev = dev = loop.dist.device
        self.vae_config = VQVAEConfig.from_name(cfg.vae_preset)
        T.seed_everything(cfg.seed)  # same initial weights on every rank
        self.model = VQVAE(self.vae_config).to(dev)
        self.disc = PatchDiscriminator(3, cfg.disc_channels).to(dev) if cfg.disc == "patch" else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.tokenizer_lr, betas=(0.9, 0.95),
                                     weight_decay=0.0)
        self.opt_d = (torch.optim.AdamW(self.disc.parameters(), lr=cfg.tokenizer_lr, betas=(0.9, 0.95),
                                        weight_decay=5e-4) if self.disc is not None else None)
        self.ema = T.make_ema(self.model, cfg.ema_decay)  # None at --ema-decay 0
        self.fixed_x = T.collate(val_set, list(range(min(16, len(val_set)))))[0].to(dev)
        d = loop.dist
        self.net = DDP(self.model) if d.world_size > 1 else self.model
        self.net_d = DDP(self.disc) if (self.disc is not None and d.world_size > 1) else self.disc

    def config(self) -> dict:
        return {"model": dataclasses.asdict(self.model.config), "train": self.cfg.as_dict()}

    def options(self) -> dict:
        return {"model": dataclasses.asdict(self.model.config), "disc": self.cfg.disc}

    def state_dict(self) -> dict:
        state = {"optimizer": self.opt.state_dict()}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_optimizer=self.opt_d.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        if self.disc is not None:
            checkpoint.load_strict(self.disc, state["disc"], "VAR tokenizer discriminator state")
            self.opt_d.load_state_dict(state["disc_optimizer"])

    def step(self, idx: list[int], step: int, epoch: int) -> dict:
        cfg, dev, vae, disc = self.cfg, self.dev, self.model, self.disc
        x = T.collate(self.train_set, idx)[0].to(dev, non_blocking=True)
        use_disc = disc is not None and cfg.disc_weight > 0
        with T.autocast(dev, cfg.amp):  # constant LR, as NVG's tokenizer script
            rec, vq_loss, hits_SV = self.net(x)
            rec = rec.float()
            l1 = (rec - x).abs().mean()
            loss = l1 + cfg.vq_weight * vq_loss
            if use_disc:
                disc.requires_grad_(False)  # the generator loss must not touch D's gradients (or DDP hooks)
                loss = loss + cfg.disc_weight * generator_loss(disc(rec))
                disc.requires_grad_(True)
        if self.loop.update(self.opt, loss, vae.parameters(), cfg.grad_clip, "VAR tokenizer loss"):
            with torch.no_grad():  # per-scale usage record kept in the checkpoint (released buffer)
                vae.quantize.ema_vocab_hit_SV.mul_(0.99).add_(T.all_reduce_mean(hits_SV), alpha=0.01)
            if self.ema is not None:
                self.ema.update(vae)
        scalars = {"loss": loss.detach(), "l1": l1.detach(), "vq": vq_loss.detach()}
        if use_disc:
            with T.autocast(dev, cfg.amp):
                d_loss = hinge_d_loss(*self.net_d(torch.cat([x, rec.detach()])).float().chunk(2))
            self.loop.update(self.opt_d, d_loss, disc.parameters(), cfg.grad_clip, "discriminator loss")
            scalars["d_loss"] = d_loss.detach()
        return scalars

    @torch.no_grad()
    def images(self, step: int, tag: str) -> None:
        vae = self.model
        name = "recon_ema.png" if self.ema is not None else "recon.png"
        with T.ema_weights(self.ema, vae):
            vae.eval()
            T.save_image_grid(torch.cat([self.fixed_x, vae.decode(vae.encode(self.fixed_x))]),
                              self.loop.run_dir / name, nrow=len(self.fixed_x), scale=2)
            vae.train()

    def finish(self, result: dict) -> dict:
        key, label = ("val_ema", "EMA") if self.ema is not None else ("val_raw", "raw")
        with T.ema_weights(self.ema, self.model):
            result[key] = evaluate_tokenizer(self.model, self.val_set, self.cfg.eval_images, 64, self.dev)
        checkpoint.atomic_write_text(self.loop.run_dir / "metrics.json", json.dumps(result, indent=2))
        print(f"var tokenizer: {result['steps']} steps, val PSNR ({label}) {result[key]['psnr']:.2f} dB, "
              f"usage {result[key]['usage']:.2f}; checkpoints in {self.loop.run_dir}")
        return result


def train_tokenizer(cfg, loop: Loop) -> dict:
    """Runs the tokenizer stage of `cfg` (nvg.baselines.var.train.TrainConfig) on `loop`; returns its metrics."""
    from nvg.data import load_dataset

    size = VQVAEConfig.from_name(cfg.vae_preset).image_size
    train_set = load_dataset(cfg.dataset, "train", size)
    val_set = load_dataset(cfg.dataset, "val", size)
    trainer = VQVAETrainer(cfg, loop, train_set, val_set)
    trainer.model.train()
    result = loop.run(trainer, len(train_set))
    if loop.dist.is_main and not loop.interrupted:
        result = trainer.finish(result)
    return result
