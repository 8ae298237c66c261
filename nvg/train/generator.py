"""Train the NVG generator on the tokens of a frozen tokenizer: `python -m nvg.train generator --tokenizer RUN_DIR`.

Teacher-forced as official (spec §4.1): every image contributes all its stages in one step, B*(K+1) content sequences
and B*(K-1) structure sequences. Loss = MSE(final canvas) + CE(tokens) per stage + flow MSE per structure stage
(`nvg.model.generator_loss`). Null class with probability 0.1, AdamW (0.9, 0.95), weight decay 0.05 on >= 2-D weights,
warm-up / constant / linear-decay LR (peak 1e-4 x global batch / 256 unless --lr), gradient clip 1, EMA, bf16 autocast
on GPU, optional torch.compile, DDP under torchrun (gloo on CPU). Writes checkpoints (atomic, exact resume), a
class-conditional sample grid (one row per class) and a per-stage strip under out_dir.
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
from ..model import GeneratorConfig, NVGGenerator, generator_loss
from ..quantizer import VGS
from ..sample import SampleConfig, Sampler
from ..sample.loading import load_tokenizer, tokenizer_reference
from .sharding import CheckpointWeights, ema_model, ema_update, full_weights, load_optimizer, optimizer_state, shard
from ..tokenizer import Tokenizer


@dataclass
class TrainConfig:
    """Defaults are the main job's tiny CPU run (`python -m nvg.train`); the official ImageNet recipe is
    `--preset nvg-d16 --lr 0` (= 1e-4 x batch / 256) `--ema-decay 0.9999 --warmup-steps 1000 --max-minutes 0`."""

    tokenizer: str = "runs/main/tokenizer"  # tokenizer run directory or checkpoint directory (frozen)
    preset: str = "nvg-tiny"  # generator preset; latent size, channels, vocabulary and classes come from the data
    depth: int | None = None  # override the preset's depth / width / head_dim
    width: int | None = None
    head_dim: int | None = None
    dataset: str = "fashion-mnist"
    max_images: int | None = None  # train on the first n images only (quick experiments, tests)
    out_dir: str = "runs/generator"
    steps: int = 5000  # main job: many small steps learn more in a few CPU-minutes than fewer large ones
    batch_size: int = 8  # per process
    lr: float | None = 3e-3  # peak LR; None or 0 = 1e-4 x global batch / 256 (official scaling)
    schedule: str = "wsd"  # warm-up, constant, linear decay to final_lr_ratio from decay_start x steps
    warmup_steps: int = 50  # official: 1000
    decay_start: float = 0.8
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.99  # official: 0.9999 (hundreds of thousands of steps)
    null_class_prob: float = 0.1  # classifier-free guidance training
    repa_weights: str | None = None  # DINOv2 ViT-*/14 state_dict file: enables REPA (official: ViT-B/14, weight 0.5)
    repa_weight: float = 0.5
    repa_depth: int = 8  # content block whose output is aligned (capped at the depth)
    cache_tokens: bool = True  # encode the dataset once (exact for datasets without random augmentation)
    compile: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state with FSDP2 under torchrun (d20 / d24)
    amp: bool = True  # bf16 autocast (GPU only)
    sample_every: int = 1000
    samples_per_class: int = 8
    sample_steps: int = 25  # structure Euler steps for the sample grids
    ckpt_every: int = 250
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    device: str | None = None
    threads: int | None = None  # torch CPU threads (default: unchanged); 1 is fastest on a busy machine
    max_minutes: float | None = None  # stop (with a checkpoint) after this wall-clock time (None or 0 = no limit)
    stop_after: int | None = None  # stop as if killed after this step (resume tests)


@torch.no_grad()
def encode_dataset(tok: Tokenizer, dataset, device, batch_size: int = 256) -> dict:
    """Tokens (N, 2**(K+1)-1), label maps (N, K+1, N_pos) and class ids of a whole dataset."""
    toks, labs, ys = [], [], []
    for s in range(0, len(dataset), batch_size):
        x, y = T.collate(dataset, list(range(s, min(len(dataset), s + batch_size))))
        vgs = tok.encode(x.to(device))
        toks.append(vgs.tokens_cat().cpu())
        labs.append(vgs.labels.to(torch.int16 if vgs.labels.shape[-1] < 32768 else torch.long).cpu())
        ys.append(y)
    return {"tokens": torch.cat(toks), "labels": torch.cat(labs), "y": torch.cat(ys)}


def vgs_from_tokens(tok: Tokenizer, tokens_cat: torch.Tensor, labels: torch.Tensor) -> VGS:
    """Rebuild canvases and f_hat of a batch from its tokens and label maps (quantizer codes + phi_i)."""
    q = tok.quantize
    labels = labels.long()
    tokens = [tokens_cat[:, 2**i - 1:2 ** (i + 1) - 1] for i in range(q.num_stages)]
    canvas, acc = [], None
    for i in range(q.num_stages):
        h = q.embed_stage(i, tokens[i], labels[:, i])
        canvas.append(torch.zeros_like(h) if acc is None else acc)
        acc = h if acc is None else acc + h
    return VGS(tokens, labels, torch.stack(canvas, 1), acc)


@torch.no_grad()
def estimate_scale_factors(tok: Tokenizer, cache: dict, device, n: int = 512) -> tuple[float, ...]:
    """sigma_i = 1 / std(canvas_i) (sigma_0 = 1: the stage-0 input is the learned start embedding) and
    sigma_{K+1} = 1 / std(f_hat): the per-stage normalisers the official values look like (spec §3.3)."""
    vgs = vgs_from_tokens(tok, cache["tokens"][:n].to(device), cache["labels"][:n].to(device))
    stds = [1.0] + [vgs.canvas[:, i].std().item() for i in range(1, vgs.canvas.shape[1])] + [vgs.f_hat.std().item()]
    return tuple(1.0 if i == 0 else round(1.0 / max(s, 1e-6), 4) for i, s in enumerate(stds))


@torch.no_grad()
def write_samples(model: NVGGenerator, tok: Tokenizer, num_classes: int, per_class: int, steps: int, out: Path,
                  tag: str, seed: int = 0) -> Path:
    """One row per class (`samples_<tag>.png`) and a per-stage strip of the first sample of each class."""
    model.eval()
    sampler = Sampler(model, tok)
    y = torch.arange(num_classes, device=tok.quantize.embedding.weight.device).repeat_interleave(per_class)
    sc = SampleConfig(structure_steps=steps, content_cfg=(1.0, 3.0), structure_cfg=(1.0, 2.0))
    vgs = sampler.generate(y, sc, seed=seed)
    T.save_image_grid(tok.decode(vgs.f_hat), out / f"samples_{tag}.png", nrow=per_class, scale=2)
    first = torch.arange(num_classes, device=y.device) * per_class
    sub = VGS([t[first] for t in vgs.tokens], vgs.labels[first], vgs.canvas[first], vgs.f_hat[first])
    stages = tok.decode_stages(sub)
    T.save_image_grid(torch.stack(stages, 1).flatten(0, 1), out / f"stages_{tag}.png", nrow=len(stages), scale=2)
    model.train()
    return out / f"samples_{tag}.png"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on >= 2-D weights only (official)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def main(cfg: TrainConfig) -> dict:
    from ..data import load_dataset

    if cfg.steps < 1 or cfg.batch_size < 1 or not 0 <= cfg.null_class_prob < 1:
        raise ValueError(f"need steps, batch_size >= 1 and null_class_prob in [0, 1), got {cfg.steps}, "
                         f"{cfg.batch_size}, {cfg.null_class_prob}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = T.init_distributed(cfg.device)
    dev, out = d.device, Path(cfg.out_dir)
    tok, tok_ref = load_tokenizer(cfg.tokenizer, dev)
    tcfg = tok.config
    train_set = load_dataset(cfg.dataset, "train", tcfg.image_size)
    num_classes = getattr(train_set, "num_classes", None) or len(train_set.class_names)
    class_names = list(getattr(train_set, "class_names", []))
    if cfg.max_images is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(cfg.max_images, len(train_set))))
    overrides = dict(latent_hw=(tcfg.latent_size,) * 2, latent_dim=tcfg.latent_channels,
                     vocab_size=tcfg.codebook_size, num_classes=num_classes)
    overrides.update({k: getattr(cfg, k) for k in ("depth", "width", "head_dim") if getattr(cfg, k) is not None})
    if cfg.depth is not None and cfg.width is None and cfg.preset.startswith("nvg-d"):
        overrides["width"] = 64 * cfg.depth

    dino = None
    if cfg.repa_weights:
        from .dinov2 import DINOv2

        dino = DINOv2.from_file(cfg.repa_weights).to(dev)
    t_enc = time.time()
    cache = encode_dataset(tok, train_set, dev) if cfg.cache_tokens else None
    if d.is_main and cache is not None:
        print(f"generator: encoded {len(train_set)} images to token sequences in {time.time() - t_enc:.0f} s")
    ckpt = T.latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        saved = T.read_config(ckpt)
        if saved.get("kind") != "generator":
            raise ValueError(f"{ckpt} is a {saved.get('kind')!r} checkpoint, not a generator one")
        gcfg = GeneratorConfig(**saved["model"])
        if (gcfg.repa_dim > 0) != (dino is not None):
            raise ValueError(f"{ckpt} was trained {'with' if gcfg.repa_dim else 'without'} REPA: resume "
                             f"{'with' if gcfg.repa_dim else 'without'} --repa-weights")
    else:
        if cache is None:
            raise ValueError("--no-cache-tokens needs a resumed run or --cache-tokens to estimate the canvas scales")
        sf = estimate_scale_factors(tok, cache, dev) if tcfg.latent_size != 16 else None
        if dino is not None:
            depth = overrides.get("depth", GeneratorConfig.from_name(cfg.preset).depth)
            overrides.update(repa_dim=dino.dim, repa_depth=min(cfg.repa_depth, depth))
        gcfg = GeneratorConfig.from_name(cfg.preset, **overrides, scale_factors=sf)
    T.seed_everything(cfg.seed)
    model = NVGGenerator(gcfg).to(dev)
    global_batch = cfg.batch_size * d.world_size
    peak_lr = cfg.lr if cfg.lr else 1e-4 * global_batch / 256
    ema = T.EMA(model, cfg.ema_decay)  # a full fp32 copy on every rank, also under FSDP
    fsdp = cfg.fsdp and d.world_size > 1
    config = {"kind": "generator", "model": dataclasses.asdict(gcfg), "tokenizer": tokenizer_reference(tok_ref, out),
              "class_names": class_names, "train": dataclasses.asdict(cfg)}
    step, epoch, batch_in_epoch = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(T.load_weights(ckpt))
        ema.load_state_dict(T.load_weights(ckpt, ema=True))
        state = T.load_state(ckpt)
    if fsdp:
        shard(model)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak_lr, betas=(0.9, 0.95))
    if ckpt is not None:
        load_optimizer(model, opt, state["optimizer"], fsdp)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        T.set_rng_state(state["rng"][d.rank] if isinstance(state["rng"], list) else state["rng"])
    else:
        T.seed_everything(cfg.seed + 1000 * d.rank)
    net = DDP(model) if d.world_size > 1 and not fsdp else model
    if cfg.compile:
        net = torch.compile(net)
    batches = T.ResumableBatches(len(train_set), cfg.batch_size, cfg.seed, d.rank, d.world_size)
    gen = torch.Generator(dev).manual_seed(cfg.seed * 7919 + step * 31 + d.rank)  # null-class / noise draws
    if ckpt is not None and "gen_state" in state:
        gen.set_state(state["gen_state"][d.rank] if isinstance(state["gen_state"], list) else state["gen_state"])
    bar = T.progress(cfg.steps, step, d.is_main, desc="generator")
    start_step, t0, stop_reason, last = step, time.time(), None, {}

    def save(step, epoch, b):
        snap = {"rng": T.rng_state(), "gen_state": gen.get_state()}
        if d.world_size > 1:
            snaps = [None] * d.world_size
            torch.distributed.all_gather_object(snaps, snap)
        else:
            snaps = [snap]
        opt_sd, weights = optimizer_state(model, opt, fsdp), full_weights(model, fsdp)  # collectives under FSDP
        if d.is_main:
            state = {"optimizer": opt_sd, "step": step, "epoch": epoch, "batch_in_epoch": b,
                     "rng": [s["rng"] for s in snaps], "gen_state": [s["gen_state"] for s in snaps]}
            T.save_checkpoint(out, step, CheckpointWeights(weights), config, state, ema)

    model.train()
    for epoch, b, idx in batches.iterate(epoch, batch_in_epoch):
        if step >= cfg.steps:
            break
        x = None
        if cache is not None:
            vgs = vgs_from_tokens(tok, cache["tokens"][idx].to(dev), cache["labels"][idx].to(dev))
            y = cache["y"][idx].to(dev)
        else:
            x, y = T.collate(train_set, idx)
            x, y = x.to(dev), y.to(dev)
            vgs = tok.encode(x)
        repa_target = None
        if dino is not None:  # DINOv2 patch features of the same images, one patch per latent position
            x = T.collate(train_set, idx)[0].to(dev) if x is None else x
            repa_target = dino.patch_features(x, tcfg.latent_size)
        drop = torch.rand(y.shape, generator=gen, device=dev) < cfg.null_class_prob
        y = torch.where(drop, torch.full_like(y, num_classes), y)
        T.set_lr(opt, peak_lr * T.lr_factor(step, cfg.steps, cfg.schedule, cfg.warmup_steps, cfg.decay_start,
                                            cfg.final_lr_ratio))
        with T.autocast(dev, cfg.amp):
            res = net(vgs.canvas, vgs.labels, y, generator=gen)
            loss, terms = generator_loss(res, vgs.f_hat, vgs.tokens, repa_target, cfg.repa_weight)
        T.optimizer_step(opt, loss, model.parameters(), cfg.grad_clip, step, "generator loss")
        ema_update(ema, model)
        step += 1
        last = terms
        if d.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            ce = sum(v for k, v in terms.items() if k.startswith("ce_")) / gcfg.num_stages
            acc = sum(v for k, v in terms.items() if k.startswith("acc_")) / gcfg.num_stages
            bar.set_postfix(loss=f"{terms['loss']:.3f}", ce=f"{ce:.2f}", acc=f"{acc:.2f}", refresh=False)
        bar.update(1)
        if cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes:
            stop_reason = f"time budget of {cfg.max_minutes} min reached"
        if cfg.stop_after is not None and step >= cfg.stop_after:
            stop_reason = f"stop_after={cfg.stop_after}"
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_reason:
            save(step, epoch, b + 1)
        if d.is_main and step % cfg.sample_every == 0 and step != cfg.steps and not stop_reason:
            write_samples(ema_model(gcfg, ema, dev), tok, num_classes, min(cfg.samples_per_class, 4),
                          cfg.sample_steps, out, f"{step:06d}")
        if stop_reason:
            break
    bar.close()
    result = {"steps": step, "steps_this_run": step - start_step, "seconds": time.time() - t0,
              "stopped": stop_reason, "last_terms": last, "checkpoint": None, "samples": None}
    if d.is_main:
        result["checkpoint"] = str(T.latest_checkpoint(out))
        if not (stop_reason or "").startswith("stop_after"):
            result["samples"] = str(write_samples(ema_model(gcfg, ema, dev), tok, num_classes,
                                                  cfg.samples_per_class, cfg.sample_steps, out, "final"))
            (out / "metrics.json").write_text(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
            print(f"generator: {step} steps in {result['seconds'] / 60:.1f} min; class-conditional samples (one row "
                  f"per class) in {result['samples']}, per-stage strip in {out / 'stages_final.png'}, checkpoint "
                  f"{result['checkpoint']}")
    T.destroy_distributed()
    result["model"] = model
    return result
