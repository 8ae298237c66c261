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

from .. import checkpoint
from . import common as T
from .loop import Loop, LoopConfig
from ..model import GeneratorConfig, NVGGenerator, generator_loss
from ..quantizer import VGS
from ..sample import SampleConfig, Sampler
from ..sample.loading import load_tokenizer, tokenizer_reference
from .sharding import ema_update, full_weights, load_full_weights, load_optimizer, optimizer_state, plain_model, shard
from ..tokenizer import Tokenizer


@dataclass
class TrainConfig(LoopConfig):
    """Defaults are the main job's tiny CPU run (`python -m nvg.train`); the official ImageNet recipe is
    `--preset nvg-d16 --lr 0` (= 1e-4 x batch / 256) `--ema-decay 0.9999 --warmup-steps 1000 --max-minutes 0
    --sample-steps 25 --sample-content-cfg 1 3.5 --sample-structure-cfg 1 2.5`."""

    tokenizer: str = "runs/main/tokenizer"  # tokenizer run directory or checkpoint directory (frozen)
    preset: str = "nvg-tiny-fast"  # generator preset (the main job's: the fast variant, at least as good as the
    # official structure transformer at its budget on the means of ten runs each, README "Fast NVG"; `--preset
    # nvg-tiny` for the official one); latent size, channels, vocabulary and classes come from the data
    depth: int | None = None  # override the preset's depth / width / head_dim
    width: int | None = None
    head_dim: int | None = None
    structure_depth: int | None = None  # override the preset's structure blocks (0 = depth)
    dataset: str = "fashion-mnist"
    max_images: int | None = None  # train on the first n images only (quick experiments, tests)
    out_dir: str = "runs/generator"
    steps: int = 5000  # main job: many small steps learn more in a few CPU-minutes than fewer large ones
    batch_size: int = 8  # per process
    log_every: int = 10
    ckpt_every: int = 250
    lr: float | None = 6e-3  # peak LR (main job: 6e-3 beat 3e-3 and 1.2e-2 at 2000 steps, docs/experiments.md §1);
    # None or 0 = 1e-4 x global batch / 256 (official scaling)
    schedule: str = "wsd"  # warm-up, constant, linear decay to final_lr_ratio from decay_start x steps
    warmup_steps: int = 50  # official: 1000
    decay_start: float = 0.8
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 = no averaging (no EMA copy; the checkpoints hold the raw weights only). Official:
    # 0.9999 (hundreds of thousands of steps). At the main job's few thousand steps the schedule's decay already
    # anneals, and EMA 0.99 sampled worse than the raw weights of the same runs (docs/experiments.md §1)
    null_class_prob: float = 0.1  # classifier-free guidance training
    repa_weights: str | None = None  # DINOv2 ViT-*/14 state_dict file: enables REPA (official: ViT-B/14, weight 0.5)
    repa_weight: float = 0.5
    repa_depth: int = 8  # content block whose output is aligned (capped at the depth)
    cache_tokens: bool = True  # encode the dataset once (exact for datasets without random augmentation)
    compile: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state with FSDP2 under torchrun (d20 / d24)
    image_every: int = 1000  # sample grids every this many steps
    samples_per_class: int = 8
    sample_steps: int | None = 2  # structure-flow steps the checkpoint records as nvg.sample's default for this model
    # (and its grids use); None: the variant's (official 25, fast 2). Main job: 2 Euler steps sample the official
    # model better than 25 at its budget (README "Fast NVG", quality against structure steps)
    # the CFG schedules (start, end) the checkpoint records as nvg.sample's defaults for this model (and its grids
    # use). Main job: (1, 7) and (1, 6) beat the official (1, 3.5) and (1, 2.5) in FD-proxy and class accuracy on
    # both variants at its budget (docs/experiments.md §2, quality against guidance)
    sample_content_cfg: tuple[float, float] = (1.0, 7.0)
    sample_structure_cfg: tuple[float, float] = (1.0, 6.0)

    def __post_init__(self):
        super().__post_init__()
        T.check_ema_decay(self.ema_decay)
        if not 0 <= self.null_class_prob < 1:
            raise ValueError(f"--null-class-prob must be in [0, 1), got {self.null_class_prob}")
        if self.samples_per_class < 1 or (self.sample_steps is not None and self.sample_steps < 1):
            raise ValueError(f"--samples-per-class and --sample-steps must be >= 1, got {self.samples_per_class} "
                             f"and {self.sample_steps}")
        if self.lr is not None and self.lr < 0:
            raise ValueError(f"--lr must be >= 0 (0: the official 1e-4 x batch / 256), got {self.lr}")
        # refused before any work: an unknown preset, a bad CFG schedule (kept as GeneratorConfig checks it: floats)
        g = GeneratorConfig.from_name(self.preset, sample_content_cfg=self.sample_content_cfg,
                                      sample_structure_cfg=self.sample_structure_cfg)
        self.sample_content_cfg, self.sample_structure_cfg = g.sample_content_cfg, g.sample_structure_cfg


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
def write_samples(model: NVGGenerator, tok: Tokenizer, num_classes: int, per_class: int, out: Path, tag: str,
                  seed: int = 0) -> Path:
    """One row per class (`samples_<tag>.png`) and a per-stage strip of the first sample of each class, drawn with
    `python -m nvg.sample`'s defaults for the model (the structure steps and CFG schedules its config records)."""
    model.eval()
    sampler = Sampler(model, tok)
    y = torch.arange(num_classes, device=tok.quantize.embedding.weight.device).repeat_interleave(per_class)
    vgs = sampler.generate(y, SampleConfig(), seed=seed)
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


CLI_ALIASES = {"image_every": ("--sample-every",)}  # the option's earlier name keeps working


class GeneratorTrainer:
    """Content + structure transformers, teacher-forced over all stages of each image (official)."""

    kind = "generator"

    def __init__(self, cfg: TrainConfig, loop: Loop, tok: Tokenizer, tok_ref: dict, train_set, num_classes: int,
                 class_names: list[str], dino=None, cache: dict | None = None):
        self.cfg, self.loop, self.tok, self.tok_ref, self.train_set = cfg, loop, tok, tok_ref, train_set
        self.num_classes, self.class_names, self.dino, self.cache = num_classes, class_names, dino, cache
        d = loop.dist
        self.dev = dev = d.device
        self.gcfg = self._model_config()
        T.seed_everything(cfg.seed)
        self.model = NVGGenerator(self.gcfg).to(dev)
        self.peak_lr = cfg.lr if cfg.lr else 1e-4 * cfg.batch_size * d.world_size / 256
        self.fsdp = cfg.fsdp and d.world_size > 1
        # the averaged weights: a full fp32 copy on every rank. At decay 0 they are the raw weights and no copy is kept
        # (the checkpoints then hold no ema.safetensors and load the raw weights)
        self.ema = T.make_ema(self.model, cfg.ema_decay)
        self._grid_weights = None  # FSDP without EMA: the full weights, gathered for the sample grids only
        self.opt = None  # made in wrap(), after sharding
        self.gen = torch.Generator(dev).manual_seed(cfg.seed * 7919 + d.rank)  # null-class / noise draws

    def _model_config(self) -> GeneratorConfig:
        cfg, tcfg = self.cfg, self.tok.config
        overrides = dict(latent_hw=(tcfg.latent_size,) * 2, latent_dim=tcfg.latent_channels,
                         vocab_size=tcfg.codebook_size, num_classes=self.num_classes,
                         sample_content_cfg=cfg.sample_content_cfg, sample_structure_cfg=cfg.sample_structure_cfg,
                         sample_structure_steps=cfg.sample_steps)
        overrides.update({k: getattr(cfg, k) for k in ("depth", "width", "head_dim", "structure_depth")
                          if getattr(cfg, k) is not None})
        if cfg.depth is not None and cfg.width is None and cfg.preset.startswith("nvg-d"):
            overrides["width"] = 64 * cfg.depth
        if self.dino is not None:
            depth = overrides.get("depth", GeneratorConfig.from_name(cfg.preset).depth)
            overrides.update(repa_dim=self.dino.dim, repa_depth=min(cfg.repa_depth, depth))
        if tcfg.latent_size != 16:  # the official scale factors are for 16x16 latents: estimate them from the data
            if self.cache is None:
                raise ValueError("--no-cache-tokens needs a 16x16 latent: the canvas scales of other latents are "
                                 "estimated from the cached tokens")
            overrides["scale_factors"] = estimate_scale_factors(self.tok, self.cache, self.loop.dist.device)
        return GeneratorConfig.from_name(cfg.preset, **overrides)

    def config(self) -> dict:
        return {"model": dataclasses.asdict(self.gcfg), "tokenizer": tokenizer_reference(self.tok_ref, self.cfg.out_dir),
                "class_names": self.class_names, "train": dataclasses.asdict(self.cfg)}

    def options(self) -> dict:
        """A resumed run must use the same model and the same tokenizer (by content)."""
        c = self.cfg
        return {"preset": c.preset, "depth": c.depth, "width": c.width, "head_dim": c.head_dim,
                "structure_depth": c.structure_depth,
                "repa": self.dino is not None, "fsdp": self.fsdp, "tokenizer_hash": self.tok_ref["hash"],
                "dataset": c.dataset, "max_images": c.max_images}

    def wrap(self) -> None:
        if self.fsdp:
            shard(self.model)
        self.opt = torch.optim.AdamW(param_groups(self.model, self.cfg.weight_decay), lr=self.peak_lr,
                                     betas=(0.9, 0.95))
        net = DDP(self.model) if self.loop.dist.world_size > 1 and not self.fsdp else self.model
        self.net = torch.compile(net) if self.cfg.compile else net

    def weights(self) -> dict:
        return full_weights(self.model, self.fsdp)  # a collective under FSDP

    def load_weights(self, ckpt: checkpoint.Checkpoint) -> None:
        saved_sf = ckpt.config.get("model", {}).get("scale_factors")
        if saved_sf is not None:  # the estimated canvas scales are buffers: the checkpoint's values are loaded below
            self.gcfg = dataclasses.replace(self.gcfg, scale_factors=tuple(saved_sf))
            self.model.config = self.gcfg
        sd = ckpt.weights(ema=False)
        if self.fsdp:  # sharded parameters take the full state dict through the distributed API
            load_full_weights(self.model, sd)
        else:
            checkpoint.load_strict(self.model, sd, f"{ckpt.path}")
        if self.ema is not None:
            self.ema.load_state_dict(ckpt.ema_weights())

    def state_dict(self) -> dict:
        return {"optimizer": optimizer_state(self.model, self.opt, self.fsdp)}

    def load_state_dict(self, state: dict) -> None:
        load_optimizer(self.model, self.opt, state["optimizer"], self.fsdp)

    def rank_state(self) -> dict:
        return {"gen_state": self.gen.get_state()}

    def load_rank_state(self, state: dict) -> None:
        if "gen_state" in state:
            self.gen.set_state(state["gen_state"])

    def step(self, idx: list[int], step: int, epoch: int) -> dict:
        cfg, dev, tok = self.cfg, self.dev, self.tok
        x = None
        if self.cache is not None:
            vgs = vgs_from_tokens(tok, self.cache["tokens"][idx].to(dev), self.cache["labels"][idx].to(dev))
            y = self.cache["y"][idx].to(dev)
        else:
            x, y = T.collate(self.train_set, idx)
            x, y = x.to(dev), y.to(dev)
            vgs = tok.encode(x)
        repa_target = None
        if self.dino is not None:  # DINOv2 patch features of the same images, one patch per latent position
            x = T.collate(self.train_set, idx)[0].to(dev) if x is None else x
            repa_target = self.dino.patch_features(x, tok.config.latent_size)
        drop = torch.rand(y.shape, generator=self.gen, device=dev) < cfg.null_class_prob
        y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        T.set_lr(self.opt, self.peak_lr * T.lr_factor(self.loop.schedule_step(step), cfg.steps, cfg.schedule,
                                                      cfg.warmup_steps, cfg.decay_start, cfg.final_lr_ratio))
        with T.autocast(dev, cfg.amp):
            res = self.net(vgs.canvas, vgs.labels, y, generator=self.gen)
            loss, terms = generator_loss(res, vgs.f_hat, vgs.tokens, repa_target, cfg.repa_weight)
        if self.loop.update(self.opt, loss, self.model.parameters(), cfg.grad_clip, "generator loss"):
            if self.ema is not None:
                ema_update(self.ema, self.model)
        return terms

    def log_text(self, values: dict) -> dict:
        S = self.gcfg.num_stages
        return {"loss": values["loss"], "ce": sum(v for k, v in values.items() if k.startswith("ce_")) / S,
                "acc": sum(v for k, v in values.items() if k.startswith("acc_")) / S}

    def images(self, step: int, tag: str) -> None:
        if tag == "final":  # finish() draws the full grid
            return
        write_samples(self.grid_model(), self.tok, self.num_classes,
                      min(self.cfg.samples_per_class, 4), self.loop.run_dir, tag)

    def gather_for_images(self) -> None:
        """Every rank, before `images`: under FSDP without EMA, gather the full weights (a collective) for the grid."""
        if self.fsdp and self.ema is None:
            self._grid_weights = full_weights(self.model, True)

    def grid_model(self) -> NVGGenerator:
        """An eval-mode copy of the weights the checkpoints sample: the EMA copy, or the raw weights (main rank;
        under FSDP the ones gathered for the grid, else those of the last checkpoint)."""
        if self.ema is not None:
            weights = self.ema.state_dict()
        elif not self.fsdp:
            weights = self.model.state_dict()
        else:
            weights = self._grid_weights
            if weights is None:  # e.g. a resumed run that was already complete: nothing was gathered
                weights = checkpoint.open_checkpoint(self.loop.run_dir, self.kind).weights(ema=False)
        return plain_model(self.gcfg, weights, self.dev)

    def finish(self, result: dict) -> dict:
        out = self.loop.run_dir
        result["samples"] = str(write_samples(self.grid_model(), self.tok, self.num_classes,
                                              self.cfg.samples_per_class, out, "final"))
        checkpoint.atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
        print(f"generator: {result['steps']} steps in {result['seconds'] / 60:.1f} min; class-conditional samples "
              f"(one row per class) in {result['samples']}, per-stage strip in {out / 'stages_final.png'}, loss "
              f"curve in {out / 'loss.png'}, checkpoint {result['checkpoint']}")
        return result


def main(cfg: TrainConfig) -> dict:
    from ..data import load_dataset

    loop = Loop.start(cfg, cfg.out_dir, "generator")
    d = loop.dist
    tok, tok_ref = load_tokenizer(cfg.tokenizer, d.device)
    train_set = load_dataset(cfg.dataset, "train", tok.config.image_size)
    num_classes = getattr(train_set, "num_classes", None) or len(train_set.class_names)
    class_names = list(getattr(train_set, "class_names", []))
    if cfg.max_images is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(cfg.max_images, len(train_set))))
    dino = None
    if cfg.repa_weights:
        from .dinov2 import DINOv2

        dino = DINOv2.from_file(cfg.repa_weights).to(d.device)
    t_enc = time.time()
    cache = encode_dataset(tok, train_set, d.device) if cfg.cache_tokens else None
    if d.is_main and cache is not None:
        print(f"generator: encoded {len(train_set)} images to token sequences in {time.time() - t_enc:.0f} s")
    trainer = GeneratorTrainer(cfg, loop, tok, tok_ref, train_set, num_classes, class_names, dino, cache)
    trainer.wrap()
    trainer.model.train()
    result = loop.run(trainer, len(train_set))
    result["samples"] = None
    if d.is_main and not loop.interrupted:
        result = trainer.finish(result)
    T.destroy_distributed()
    result["model"] = trainer.model
    return result
