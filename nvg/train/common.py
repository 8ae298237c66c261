"""Shared training machinery: distributed set-up, precision, seeds, EMA, LR schedules, resumable batches, progress
bar and image grids. The loop is nvg/train/loop.py; checkpoints are nvg/checkpoint.py."""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; with WORLD_SIZE > 1 join the process group (nccl on GPU,
    gloo on CPU). `device` = "cpu" / "cuda" forces a device type; default: cuda when available."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    dev_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available")
    dev = torch.device("cuda", local) if dev_type == "cuda" else torch.device(dev_type)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def destroy_distributed() -> None:
    """Leave the process group together: a rank that tears down gloo while another is still in a collective or
    writing the checkpoint can abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(x: Tensor) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


# ----------------------------------------------------------------------------- precision, seeds, RNG
def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on GPU; a no-op on CPU (bf16 convolutions are slow there and the tiny runs are fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- EMA
def check_ema_decay(decay: float) -> None:
    """Every trainer's --ema-decay: in [0, 1), 0 = no averaging (no EMA copy is kept)."""
    if not 0 <= decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1) (0: no averaging), got {decay}")


def make_ema(model: nn.Module, decay: float) -> EMA | None:
    """An EMA of `model`, or None at decay 0 (the checkpoints then hold the raw weights only)."""
    check_ema_decay(decay)
    return EMA(model, decay) if decay > 0 else None


def ema_weights(ema: EMA | None, model: nn.Module):
    """`ema.applied(model)`, or the raw weights as they are when there is no EMA."""
    return ema.applied(model) if ema is not None else contextlib.nullcontext(unwrap(model))


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers (fp32 shadow copies)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in unwrap(model).state_dict().items()
                       if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in unwrap(model).state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.float(), 1 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        from ..checkpoint import CheckpointError

        if set(sd) != set(self.shadow):
            missing, unexpected = sorted(set(self.shadow) - set(sd)), sorted(set(sd) - set(self.shadow))
            raise CheckpointError(f"EMA weights do not match the model: missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}")
        wrong = [k for k in sd if tuple(sd[k].shape) != tuple(self.shadow[k].shape)]
        if wrong:
            raise CheckpointError(f"EMA weights do not match the model: key {wrong[0]!r} has shape "
                                  f"{tuple(sd[wrong[0]].shape)}, the model expects {tuple(self.shadow[wrong[0]].shape)}")
        self.shadow = {k: v.float().clone().to(self.shadow[k].device) for k, v in sd.items()}

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Temporarily load the EMA weights into `model` (e.g. for evaluation), restore the raw ones afterwards."""
        m = unwrap(model)
        backup = {k: v.detach().clone() for k, v in m.state_dict().items() if k in self.shadow}
        m.load_state_dict(self.shadow, strict=False)
        try:
            yield m
        finally:
            m.load_state_dict(backup, strict=False)


# ----------------------------------------------------------------------------- LR schedules
def lr_factor(step: int, total_steps: int, schedule: str = "constant", warmup_steps: int = 0,
              decay_start: float = 0.8, final_ratio: float = 0.1, warmup_start: float = 0.005) -> float:
    """Multiplier of the peak LR at `step` (0-based).

    Args:
        schedule: "constant"; "cosine" (warm-up, then cosine from 1 to final_ratio at total_steps); "wsd"
            (NVG generator: warm-up, constant, linear decay to final_ratio from decay_start * total_steps).
        warmup_steps: linear warm-up from warmup_start to 1 over these steps (all schedules).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (1 - warmup_start) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "wsd":
        start = max(warmup_steps, int(decay_start * total_steps))
        if step < start:
            return 1.0
        t = min(1.0, (step - start) / max(1, total_steps - start))
        return 1 - (1 - final_ratio) * t
    raise ValueError(f"unknown LR schedule {schedule!r}: expected 'constant', 'cosine' or 'wsd'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- data order
class ResumableBatches:
    """Per-epoch shuffled index batches that can restart at any (epoch, batch): the order of epoch e is a permutation
    drawn from a generator seeded with (seed, e) alone, split across ranks like DistributedSampler (drop_last)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if n < batch_size * world_size:
            raise ValueError(f"dataset of {n} items is smaller than one global batch ({batch_size} x {world_size})")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world_size
        self.batches_per_epoch = n // (batch_size * world_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        per_rank = order[: self.batches_per_epoch * self.batch_size * self.world][self.rank :: self.world]
        return per_rank.view(self.batches_per_epoch, self.batch_size).tolist()

    def iterate(self, epoch: int, batch: int) -> Iterator[tuple[int, int, list[int]]]:
        """Yield (epoch, batch index in epoch, indices) forever, starting at (epoch, batch)."""
        while True:
            for b, idx in enumerate(self.epoch_batches(epoch)[batch:], start=batch):
                yield epoch, b, idx
            epoch, batch = epoch + 1, 0


def collate(dataset, indices: list[int]) -> tuple[Tensor, Tensor]:
    """Stack (image, label) items of a map-style dataset."""
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


# ----------------------------------------------------------------------------- logging and images
def progress(total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


def image_grid(images: Tensor, nrow: int = 8, pad: int = 2) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 (H', W', 3) grid with `nrow` images per row and white padding."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    B, C, H, W = x.shape
    ncol = min(nrow, B)
    nrows = math.ceil(B / ncol)
    grid = torch.full((C, nrows * (H + pad) + pad, ncol * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = x[i]
    return grid.permute(1, 2, 0)


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 1) -> Path:
    """Write images (B, 3, H, W) in [-1, 1] as one PNG grid (atomically); `scale` enlarges small images."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image_grid(images, nrow).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    img.save(tmp)
    os.replace(tmp, path)
    return path
