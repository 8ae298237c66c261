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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import common as T
from .discriminator import PatchDiscriminator, generator_loss, hinge_d_loss
from ..eval.metrics import codebook_usage, psnr, ssim
from ..tokenizer import Tokenizer, TokenizerConfig


@dataclass
class TrainConfig:
    preset: str = "tiny-ae-32px-8x8"  # a tokenizer preset (nvg.tokenizer.PRESETS)
    dataset: str = "fashion-mnist"  # nvg.data.load_dataset name or an ImageNet-layout folder
    out_dir: str = "runs/tokenizer"
    steps: int = 3000
    batch_size: int = 32  # per process
    lr: float = 1e-4  # official AE learning rate
    schedule: str = "constant"  # official AE as released keeps the LR constant; "cosine" as in the paper
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
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
    log_every: int = 25
    image_every: int = 500
    ckpt_every: int = 500
    eval_images: int = 512  # validation images for the final PSNR / SSIM / usage
    seed: int = 0
    resume: bool = False
    device: str | None = None  # "cpu" / "cuda"; default cuda when available
    amp: bool = True  # bf16 autocast (GPU only)
    threads: int | None = None  # torch CPU threads (default: torch's choice); 1 is fastest on a busy machine
    max_minutes: float | None = None  # stop (with a checkpoint) after this wall-clock time
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as if killed: resume tests


TokenizerTrainConfig = TrainConfig


def _validate(cfg: TrainConfig) -> None:
    if cfg.disc not in ("patch", "dino", "none"):
        raise ValueError(f"--disc must be 'patch', 'dino' or 'none', got {cfg.disc!r}")
    if cfg.disc == "dino" and not cfg.dino_weights:
        raise ValueError("--disc dino needs --dino-weights (a DINO ViT-S/16 state dict; nothing is downloaded)")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {cfg.steps} and {cfg.batch_size}")


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


def main(cfg: TrainConfig) -> dict:
    from ..data import load_dataset

    _validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = T.init_distributed(cfg.device)
    dev = d.device
    out = Path(cfg.out_dir)
    tok_cfg = TokenizerConfig.from_name(cfg.preset)
    train_set = load_dataset(cfg.dataset, "train", tok_cfg.image_size)
    val_set = load_dataset(cfg.dataset, "val", tok_cfg.image_size)

    T.seed_everything(cfg.seed)  # same initial weights on every rank
    model = Tokenizer(tok_cfg).to(dev)
    disc, lecam, augment = None, None, (lambda t: t)
    if cfg.disc == "patch":
        disc = PatchDiscriminator(tok_cfg.in_channels, cfg.disc_channels).to(dev)
    elif cfg.disc == "dino":
        from .dino_disc import DinoDiscriminator, LeCAM, diff_augment

        disc, lecam, augment = DinoDiscriminator.from_file(cfg.dino_weights).to(dev), LeCAM(), diff_augment
    d_params = [p for p in disc.parameters() if p.requires_grad] if disc else []
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    opt_d = torch.optim.AdamW(d_params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=5e-4) if disc else None
    ema = T.EMA(model, cfg.ema_decay)
    lpips = None
    if cfg.lpips_weights:
        from .lpips import LPIPS

        lpips = LPIPS.from_file(cfg.lpips_weights).to(dev).eval()

    config = {"kind": "tokenizer", "model": tok_cfg.to_dict(), "train": dataclasses.asdict(cfg)}
    step, epoch, batch_in_epoch = 0, 0, 0
    ckpt = T.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None and d.is_main:
        print(f"--resume: no checkpoint in {out}, starting from scratch")
    if ckpt is not None:
        saved = T.read_config(ckpt)
        if saved.get("kind") != "tokenizer":
            raise ValueError(f"{ckpt} is a {saved.get('kind')!r} checkpoint, not a tokenizer one")
        T.check_same_config(saved["model"], tok_cfg.to_dict(), "tokenizer configuration")
        model.load_state_dict(T.load_weights(ckpt))
        state = T.load_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            if "disc" not in state:
                raise ValueError(f"{ckpt} was trained without a discriminator; resume with --disc none")
            missing, unexpected = disc.load_state_dict(state["disc"], strict=False)
            if unexpected or any(not k.startswith("dino.") for k in missing):
                raise ValueError(f"{ckpt}: discriminator state does not match --disc {cfg.disc}")
            opt_d.load_state_dict(state["disc_optimizer"])
            if lecam is not None:
                lecam.load_state_dict(state["lecam"])
        ema.load_state_dict(T.load_weights(ckpt, ema=True))
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        T.set_rng_state(state["rng"][d.rank] if isinstance(state["rng"], list) else state["rng"])
    else:
        T.seed_everything(cfg.seed + 1000 * d.rank)

    net = DDP(model) if d.world_size > 1 else model
    net_d = DDP(disc) if (disc is not None and d.world_size > 1) else disc
    batches = T.ResumableBatches(len(train_set), cfg.batch_size, cfg.seed, d.rank, d.world_size)
    fixed_x, _ = T.collate(val_set, list(range(min(16, len(val_set)))))
    fixed_x = fixed_x.to(dev)
    K1, V = model.num_stages, tok_cfg.codebook_size
    hits = torch.zeros(K1, V, dtype=torch.bool, device=dev)
    start_step, t0, cpu0 = step, time.time(), time.process_time()
    bar = T.progress(cfg.steps, step, d.is_main, desc="tokenizer")
    stop_reason = None

    def save(step, epoch, b):
        rng = T.rng_state()
        if d.world_size > 1:  # every rank's RNG (all_gather_object keeps ranks in lockstep)
            rngs = [None] * d.world_size
            torch.distributed.all_gather_object(rngs, rng)
            rng = rngs
        if not d.is_main:
            return
        state = {"optimizer": opt.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": b, "rng": rng}
        if disc is not None:
            trainable = {k: v for k, v in disc.state_dict().items() if not k.startswith("dino.")}  # not the frozen ViT
            state.update(disc=trainable, disc_optimizer=opt_d.state_dict())
            if lecam is not None:
                state["lecam"] = lecam.state_dict()
        T.save_checkpoint(out, step, model, config, state, ema)

    model.train()
    for epoch, b, idx in batches.iterate(epoch, batch_in_epoch):
        if step >= cfg.steps:
            break
        x, _ = T.collate(train_set, idx)
        x = x.to(dev, non_blocking=True)
        lr = cfg.lr * T.lr_factor(step, cfg.steps, cfg.schedule, cfg.warmup_steps)
        T.set_lr(opt, lr)
        use_disc = disc is not None and cfg.disc_weight > 0 and step >= cfg.disc_start
        with T.autocast(dev, cfg.amp):
            rec, vq_loss, info = net(x, ibq=epoch < cfg.ibq_epochs)
            rec = rec.float()
            l1 = (rec - x).abs().mean()
            loss = cfg.l1_weight * l1 + cfg.vq_weight * vq_loss
            if lpips is not None:
                loss = loss + cfg.lpips_weight * lpips(rec, x).mean()
            if use_disc:
                for p in d_params:  # the generator loss must not touch D's gradients (or DDP hooks)
                    p.requires_grad_(False)
                g_loss = generator_loss(disc(augment(rec)))
                for p in d_params:
                    p.requires_grad_(True)
                loss = loss + cfg.disc_weight * g_loss
        T.optimizer_step(opt, loss, model.parameters(), cfg.grad_clip, step)
        ema.update(model)
        if use_disc:
            T.set_lr(opt_d, lr)
            with T.autocast(dev, cfg.amp):
                logits = net_d(augment(torch.cat([x, rec.detach()]))).float()
                d_loss = hinge_d_loss(*logits.chunk(2))
                if lecam is not None:
                    d_loss = d_loss + cfg.lecam_weight * lecam(*logits.chunk(2))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(d_params, cfg.grad_clip)
            opt_d.step()
        step += 1
        hits |= _tokens_hit(info, K1, V, dev)
        if d.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            p = psnr(rec.detach().clamp(-1, 1), x).mean().item()
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{p:.2f}", usage=f"{hits.any(0).float().mean():.2f}",
                            ibq=int(epoch < cfg.ibq_epochs), refresh=False)
            hits.zero_()
        bar.update(1)
        if cfg.max_minutes is not None:
            over = torch.tensor(float(time.time() - t0 > 60 * cfg.max_minutes), device=dev)
            if d.world_size > 1:  # every rank stops at the same step
                torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
            if over.item():
                stop_reason = f"time budget of {cfg.max_minutes} min reached"
        if cfg.stop_after is not None and step >= cfg.stop_after:
            stop_reason = f"stop_after={cfg.stop_after}"
        if d.is_main and (step % cfg.image_every == 0 or step == cfg.steps or stop_reason):
            with ema.applied(model):
                write_images(model, fixed_x, out, "ema")
            write_images(model, fixed_x, out, "raw")
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_reason:
            save(step, epoch, b + 1)
        if stop_reason:
            break
    bar.close()
    elapsed = time.time() - t0
    result = {"steps": step, "steps_this_run": step - start_step, "seconds": elapsed, "stopped": stop_reason,
              "cpu_seconds": time.process_time() - cpu0, "threads": torch.get_num_threads()}
    if d.is_main and not (stop_reason or "").startswith("stop_after"):  # a simulated kill skips the evaluation
        result["val_raw"] = evaluate(model, val_set, cfg.eval_images, 64, dev)
        with ema.applied(model):
            result["val_ema"] = evaluate(model, val_set, cfg.eval_images, 64, dev)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        print(f"tokenizer: {step} steps in {elapsed / 60:.1f} min; val PSNR raw {result['val_raw']['psnr']:.2f} dB, "
              f"EMA {result['val_ema']['psnr']:.2f} dB; images and checkpoints in {out}")
    result["model"] = model
    result["checkpoint"] = str(T.latest_checkpoint(out)) if d.is_main else None
    T.destroy_distributed()
    return result
