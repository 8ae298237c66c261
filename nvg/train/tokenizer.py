"""Train the NVG tokenizer: `python -m nvg.train tokenizer --preset tiny-ae-32px-8x8 --steps 2000`.

Loss (spec §2.3): L1 + vq_loss (per-stage, mean over stages) + lpips_weight * LPIPS (only with user-supplied weights)
+ disc_weight * non-saturating adversarial loss (PatchGAN from scratch by default; the official DINO discriminator
with DiffAug and LeCAM via --disc dino --dino-weights FILE; none with --disc none).
IBQ codebook warm-up during the first `ibq_epochs` epochs (official: 1). AdamW (0.9, 0.95), gradient clip 1, EMA.
Writes checkpoints, a reconstruction grid and a per-stage strip under out_dir; `--resume` continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import checkpoint
from . import common as T
from .loop import Loop, LoopConfig
from .discriminator import PatchDiscriminator, generator_loss, hinge_d_loss
from ..eval.metrics import codebook_usage, psnr, ssim
from ..tokenizer import Tokenizer, TokenizerConfig


@dataclass
class TrainConfig(LoopConfig):
    preset: str = "tiny-ae-32px-8x8"  # a tokenizer preset (nvg.tokenizer.PRESETS)
    dataset: str = "fashion-mnist"  # nvg.data.load_dataset name or an ImageNet-layout folder
    out_dir: str = "runs/tokenizer"
    steps: int = 3000
    lr: float = 1e-4  # official AE learning rate
    schedule: str = "constant"  # official AE as released keeps the LR constant; "cosine" as in the paper
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # 0 = no averaging (no EMA copy, no ema images or EMA validation)
    ibq_epochs: int = 1  # IBQ codebook warm-up for the first epochs (official smooth_end_epoch: 1)
    l1_weight: float = 1.0
    vq_weight: float = 1.0
    lpips_weight: float = 1.0  # used only when lpips_weights is given
    lpips_weights: str | None = None  # file with VGG16 + LPIPS linear-layer weights (see nvg.lpips)
    disc: str = "patch"  # "patch" (from scratch), "dino" (official; needs dino_weights) or "none"
    dino_weights: str | None = None  # DINO ViT-S/16 state dict (dino_deitsmall16_pretrain.pth) for --disc dino
    lecam_weight: float = 0.001  # LeCAM regulariser of the DINO discriminator (official)
    disc_weight: float = 0.1  # official gen_loss_weight
    disc_start: int = 0  # step at which the adversarial loss starts (official: 0)
    disc_channels: int = 32
    eval_images: int = 512  # validation images for the final PSNR / SSIM / usage

    def __post_init__(self):
        super().__post_init__()
        if self.disc not in ("patch", "dino", "none"):
            raise ValueError(f"--disc must be 'patch', 'dino' or 'none', got {self.disc!r}")
        if self.disc == "dino" and not self.dino_weights:
            raise ValueError("--disc dino needs --dino-weights (a DINO ViT-S/16 state dict; nothing is downloaded)")
        if self.lr <= 0 or self.eval_images < 0:
            raise ValueError(f"--lr must be > 0 and --eval-images >= 0, got {self.lr} and {self.eval_images}")
        T.check_ema_decay(self.ema_decay)
        TokenizerConfig.from_name(self.preset)  # an unknown preset is refused before any work


def _tokens_hit(info: dict, K1: int, V: int, device) -> torch.Tensor:
    hits = torch.zeros(K1, V, dtype=torch.bool, device=device)
    for i, t in enumerate(info["tokens"]):
        hits[i, t.flatten()] = True
    return hits


@torch.no_grad()
def evaluate(model: Tokenizer, dataset, n: int, batch_size: int, device) -> dict:
    """PSNR / SSIM of reconstructions through the token path, and codebook usage per stage, on n images."""
    model.eval()
    n = min(n, len(dataset))
    ps, ss, toks = [], [], [[] for _ in range(model.num_stages)]
    for s in range(0, n, batch_size):
        x, _ = T.collate(dataset, list(range(s, min(n, s + batch_size))))
        x = x.to(device)
        vgs = model.encode(x)
        rec = model.decode(vgs)
        ps.append(psnr(rec, x))
        ss.append(ssim(rec, x))
        for i, t in enumerate(vgs.tokens):
            toks[i].append(t.cpu())
    model.train()
    V = model.config.codebook_size
    usage = [codebook_usage(t, V)["usage"] for t in toks]
    return {"psnr": torch.cat(ps).mean().item(), "ssim": torch.cat(ss).mean().item(), "usage_per_stage": usage,
            "usage_all_stages": codebook_usage([t for ts in toks for t in ts], V)["usage"], "images": n}


@torch.no_grad()
def write_images(model: Tokenizer, x: torch.Tensor, out_dir: Path, tag: str) -> None:
    """recon grid (rows: originals, reconstructions) and per-stage strip (original, then the image after stage 0..K)."""
    model.eval()
    vgs = model.encode(x)
    rec = model.decode(vgs)
    n = x.shape[0]
    T.save_image_grid(torch.cat([x, rec]), out_dir / f"recon_{tag}.png", nrow=n, scale=2)
    k = min(n, 8)
    stages = model.decode_stages(vgs)
    strip = torch.stack([x[:k]] + [s[:k] for s in stages], 1).flatten(0, 1)
    T.save_image_grid(strip, out_dir / f"stages_{tag}.png", nrow=len(stages) + 1, scale=2)
    model.train()


class TokenizerTrainer:
    """Autoencoder + multi-granularity quantizer with L1, VQ, optional LPIPS and an adversarial loss."""

    kind = "tokenizer"

    def __init__(self, cfg: TrainConfig, loop: Loop, train_set, val_set):
        self.cfg, self.loop, self.train_set, self.val_set = cfg, loop, train_set, val_set
        self.dev = dev = loop.dist.device
        self.tok_cfg = TokenizerConfig.from_name(cfg.preset)
        T.seed_everything(cfg.seed)  # same initial weights on every rank
        self.model = Tokenizer(self.tok_cfg).to(dev)
        self.disc, self.lecam, self.augment = None, None, (lambda t: t)
        if cfg.disc == "patch":
            self.disc = PatchDiscriminator(self.tok_cfg.in_channels, cfg.disc_channels).to(dev)
        elif cfg.disc == "dino":
            from .dino_disc import DinoDiscriminator, LeCAM, diff_augment

            self.disc, self.lecam, self.augment = DinoDiscriminator.from_file(cfg.dino_weights).to(dev), LeCAM(), \
                diff_augment
        self.d_params = [p for p in self.disc.parameters() if p.requires_grad] if self.disc else []
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.opt_d = (torch.optim.AdamW(self.d_params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=5e-4)
                      if self.disc else None)
        self.ema = T.make_ema(self.model, cfg.ema_decay)  # None at --ema-decay 0
        self.lpips = None
        if cfg.lpips_weights:
            from .lpips import LPIPS

            self.lpips = LPIPS.from_file(cfg.lpips_weights).to(dev).eval()
        self.fixed_x = T.collate(val_set, list(range(min(16, len(val_set)))))[0].to(dev)
        self.hits = torch.zeros(self.model.num_stages, self.tok_cfg.codebook_size, dtype=torch.bool, device=dev)

    def config(self) -> dict:
        return {"model": self.tok_cfg.to_dict(), "train": dataclasses.asdict(self.cfg)}

    def options(self) -> dict:
        return {"model": self.tok_cfg.to_dict(), "disc": self.cfg.disc}

    def state_dict(self) -> dict:
        state = {"optimizer": self.opt.state_dict()}
        if self.disc is not None:
            trainable = {k: v for k, v in self.disc.state_dict().items() if not k.startswith("dino.")}  # not the ViT
            state.update(disc=trainable, disc_optimizer=self.opt_d.state_dict())
            if self.lecam is not None:
                state["lecam"] = self.lecam.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        if self.disc is not None:
            missing, unexpected = self.disc.load_state_dict(state["disc"], strict=False)
            if unexpected or any(not k.startswith("dino.") for k in missing):
                raise checkpoint.CheckpointError(f"discriminator state does not match --disc {self.cfg.disc}")
            self.opt_d.load_state_dict(state["disc_optimizer"])
            if self.lecam is not None:
                self.lecam.load_state_dict(state["lecam"])

    def wrap(self) -> None:
        d = self.loop.dist
        self.net = DDP(self.model) if d.world_size > 1 else self.model
        self.net_d = DDP(self.disc) if (self.disc is not None and d.world_size > 1) else self.disc

    def step(self, idx: list[int], step: int, epoch: int) -> dict:
        cfg, dev = self.cfg, self.dev
        x = T.collate(self.train_set, idx)[0].to(dev, non_blocking=True)
        lr = cfg.lr * T.lr_factor(self.loop.schedule_step(step), cfg.steps, cfg.schedule, cfg.warmup_steps)
        T.set_lr(self.opt, lr)
        use_disc = self.disc is not None and cfg.disc_weight > 0 and step >= cfg.disc_start
        ibq = epoch < cfg.ibq_epochs
        with T.autocast(dev, cfg.amp):
            rec, vq_loss, info = self.net(x, ibq=ibq)
            rec = rec.float()
            l1 = (rec - x).abs().mean()
            loss = cfg.l1_weight * l1 + cfg.vq_weight * vq_loss
            if self.lpips is not None:
                loss = loss + cfg.lpips_weight * self.lpips(rec, x).mean()
            if use_disc:
                for p in self.d_params:  # the generator loss must not touch D's gradients (or DDP hooks)
                    p.requires_grad_(False)
                loss = loss + cfg.disc_weight * generator_loss(self.disc(self.augment(rec)))
                for p in self.d_params:
                    p.requires_grad_(True)
        if self.loop.update(self.opt, loss, self.model.parameters(), cfg.grad_clip, "tokenizer loss"):
            if self.ema is not None:
                self.ema.update(self.model)
        scalars = {"loss": loss.detach(), "l1": l1.detach(), "vq": vq_loss.detach()}
        if use_disc:
            T.set_lr(self.opt_d, lr)
            with T.autocast(dev, cfg.amp):
                logits = self.net_d(self.augment(torch.cat([x, rec.detach()]))).float()
                d_loss = hinge_d_loss(*logits.chunk(2))
                if self.lecam is not None:
                    d_loss = d_loss + cfg.lecam_weight * self.lecam(*logits.chunk(2))
            self.loop.update(self.opt_d, d_loss, self.d_params, cfg.grad_clip, "discriminator loss")
            scalars["d_loss"] = d_loss.detach()
        self.hits |= _tokens_hit(info, self.model.num_stages, self.tok_cfg.codebook_size, dev)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            scalars["psnr"] = psnr(rec.detach().clamp(-1, 1), x).mean()
            scalars["usage"] = self.hits.any(0).float().mean()
            scalars["ibq"] = torch.tensor(float(ibq))
            self.hits = torch.zeros_like(self.hits)
        return scalars

    def log_text(self, values: dict) -> dict:
        return {k: values[k] for k in ("loss", "psnr", "usage") if k in values}

    def images(self, step: int, tag: str) -> None:
        out = self.loop.run_dir
        if self.ema is not None:
            with self.ema.applied(self.model):
                write_images(self.model, self.fixed_x, out, "ema")
        write_images(self.model, self.fixed_x, out, "raw")

    def finish(self, result: dict) -> dict:
        out = self.loop.run_dir
        result["val_raw"] = evaluate(self.model, self.val_set, self.cfg.eval_images, 64, self.dev)
        ema = ""
        if self.ema is not None:
            with self.ema.applied(self.model):
                result["val_ema"] = evaluate(self.model, self.val_set, self.cfg.eval_images, 64, self.dev)
            ema = f", EMA {result['val_ema']['psnr']:.2f} dB"
        checkpoint.atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
        print(f"tokenizer: {result['steps']} steps in {result['seconds'] / 60:.1f} min; val PSNR raw "
              f"{result['val_raw']['psnr']:.2f} dB{ema}; images, loss curve and checkpoints in {out}")
        return result


def main(cfg: TrainConfig) -> dict:
    from ..data import load_dataset

    loop = Loop.start(cfg, cfg.out_dir, "tokenizer")
    d = loop.dist
    image_size = TokenizerConfig.from_name(cfg.preset).image_size
    train_set = load_dataset(cfg.dataset, "train", image_size)
    val_set = load_dataset(cfg.dataset, "val", image_size)
    trainer = TokenizerTrainer(cfg, loop, train_set, val_set)
    trainer.wrap()
    trainer.model.train()
    result = loop.run(trainer, len(train_set))
    if d.is_main and not loop.interrupted and cfg.eval_images > 0:
        result = trainer.finish(result)
    result["model"] = trainer.model
    T.destroy_distributed()
    return result
