"""`python -m nvg.sample`: class-conditional sampling and control from a trained generator checkpoint.

    python -m nvg.sample --ckpt runs/main/generator --classes 0 3 7 --n 4 --out samples.png --stages stages.png
    python -m nvg.sample --ckpt RUN --classes 1 --n 8 --out samples.npz            # images uint8 [N,H,W,3], labels
    python -m nvg.sample --ckpt RUN --classes 5 --structure-from ref.png --structure-stages 3   # structure transfer
    python -m nvg.sample --ckpt RUN --classes 5 --structure-map maps.npy           # user label maps (S', h, w)
    python -m nvg.sample --ckpt RUN --classes 5 --structure-map mask.png           # any mask -> balanced stage-1 map
    python -m nvg.sample --ckpt RUN --classes 2 --regenerate-from ref.png --keep-stages 3   # stage-wise regeneration

The sampler settings (--content-cfg START END, --top-p, --top-k, --temperature, --structure-steps, --gumbel...) are
the fields of nvg.sample.SampleConfig, with its defaults. Every option is checked before the model is loaded: a bad
value or path prints one line and exits with code 2. Outputs are written atomically (never a partial file).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..cli import (ArgumentParser, add_dataclass_args, atomic_write, check_input_path, check_output_path,
                   dataclass_from_args, resolve_device, run)
from ..data.folder import IMAGE_EXTENSIONS
from ..data.images import read_gray, read_rgb
from ..model import GeneratorConfig
from ..quantizer import VGS
from . import control
from .loading import load_generator
from .pictures import progression
from .sampler import SampleConfig, Sampler

PROG = "python -m nvg.sample"
OUT_SUFFIXES = (".png", ".npz")

SAMPLER_HELP = {
    "content_cfg": "CFG scale on the logits, linear from START to END over the stages (default: the schedule the "
                   "checkpoint records, else the official 1 3.5)",
    "structure_cfg": "CFG scale on the structure velocity, linear from START to END over the stages (default: the "
                     "checkpoint's, else the official 1 2.5)",
    "top_p": "nucleus mass in (0, 1], falling log-wise from START to END over the stages; 1 = off",
    "top_k": "0 = off, 1 = argmax",
    "temperature": "sampling temperature (> 0)",
    "structure_steps": "solver steps of the structure flow per stage (default: the official 25 for the official "
                       "model, 2 for the fast variant)",
    "structure_solver": "structure flow solver: euler (official; the default) or heun (2nd order, 2 evaluations per "
                        "step)",
    "gumbel_split": "Gumbel top-k splits instead of deterministic top-k",
    "always_cfg": "also run the unconditional pass at CFG scale 1 (as official; same result, slower)",
}


def _h(text: str, **kw) -> dict:
    return {"help": text, **kw}


@dataclass
class SampleCommand:
    """The command's own options (the sampler settings are SampleConfig's)."""

    ckpt: str = field(metadata=_h("generator run directory or checkpoint directory"))
    classes: tuple[str, ...] | None = field(default=None, metadata=_h("class ids or names (default: all classes)"))
    n: int = field(default=4, metadata=_h("samples per class"))
    seed: int = field(default=0, metadata=_h("random seed (batch b uses seed + b)"))
    batch_size: int = field(default=64, metadata=_h("images per sampler batch"))
    out: str = field(default="samples.png", metadata=_h(".png grid (one row per class) or .npz (images, labels)"))
    stages: str | None = field(default=None, metadata=_h("also write the per-stage progression strip to this PNG"))
    device: str = field(default="auto", metadata=_h("auto (cuda when available), cpu, cuda, cuda:N"))
    ema: bool = field(default=True, metadata=_h("use the EMA weights when the run kept them (--no-ema: raw)"))
    bf16: bool = field(default=True, metadata=_h("bf16 autocast on a GPU, as official (--no-bf16: fp32)"))
    fast: bool = field(default=False, metadata=_h("torch.compile the transformer passes (same outputs)"))

    def __post_init__(self):
        for name in ("n", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if self.classes is not None:
            self.classes = tuple(str(c) for c in self.classes)
            if not self.classes:
                raise ValueError("--classes needs at least one class")
        if not str(self.out).lower().endswith(OUT_SUFFIXES):
            raise ValueError(f"--out {self.out!r} must end with .png (a grid) or .npz (images and labels)")
        if self.stages is not None:
            if not str(self.stages).lower().endswith(".png"):
                raise ValueError(f"--stages {self.stages!r} must end with .png")
            if Path(self.stages).resolve() == Path(self.out).resolve():
                raise ValueError("--stages and --out name the same file")
        self.device = resolve_device(self.device)


@dataclass
class ControlOptions:
    """Structure control (paper §7): at most one of --structure-from, --structure-map, --regenerate-from."""

    structure_from: tuple[str, ...] | None = field(
        default=None, metadata=_h("reference image(s): reuse their label maps (structure transfer)"))
    structure_map: str | None = field(default=None, metadata=_h(".npy nested label maps (S', h, w) or a mask image"))
    structure_stages: int = field(default=3, metadata=_h("stages of reference structure to keep"))
    regenerate_from: tuple[str, ...] | None = field(
        default=None, metadata=_h("reference image(s) for stage-wise regeneration"))
    keep_stages: int = field(default=3, metadata=_h("regeneration keeps stages < this of the reference"))
    keep_structure_only: bool = field(default=False, metadata=_h("regeneration keeps only the structure"))

    def __post_init__(self):
        given = [o for o in ("structure_from", "structure_map", "regenerate_from") if getattr(self, o)]
        if len(given) > 1:
            raise ValueError(f"use only one of {', '.join('--' + o.replace('_', '-') for o in given)}")
        for name in ("structure_stages", "keep_stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.keep_structure_only and not self.regenerate_from:
            raise ValueError("--keep-structure-only applies to --regenerate-from only")
        m = self.structure_map
        if m is not None and not m.lower().endswith((".npy",) + IMAGE_EXTENSIONS):
            raise ValueError(f"--structure-map {m!r} must be a .npy file of label maps or an image "
                             f"({', '.join(IMAGE_EXTENSIONS)})")

    @property
    def references(self) -> tuple[str, ...] | None:
        return self.structure_from or self.regenerate_from


# ------------------------------------------------------------------------------------------------------ inputs
def resize_images(arrays: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 RGB arrays [H, W, 3] -> (B, 3, size, size) in [-1, 1] (Lanczos)."""
    from PIL import Image

    out = []
    for a in arrays:
        img = Image.fromarray(a).resize((size, size), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def read_images(paths: list[str], size: int) -> torch.Tensor:
    """Image files -> (B, 3, size, size) in [-1, 1] (RGB via nvg.data.images.read_rgb, resized with Lanczos)."""
    return resize_images([read_rgb(p) for p in paths], size)


def read_structure_source(path: str) -> np.ndarray:
    """The raw content of --structure-map: integer label maps from a .npy, or a float luminance mask from an image."""
    if path.lower().endswith(".npy"):
        try:
            maps = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npy array ({e})") from None
        if maps.dtype.kind not in "iuf":
            raise ValueError(f"{path}: label maps must be numbers, got dtype {maps.dtype}")
        return maps
    return read_gray(path)


def read_structure(path: str, latent_hw: tuple[int, int]) -> torch.Tensor:
    """.npy label maps (S', h, w) / (B, S', h, w), or an image mask -> nested maps (B, S', N)."""
    return as_structure(read_structure_source(path), path, latent_hw)


def as_structure(raw: np.ndarray, path: str, latent_hw: tuple[int, int]) -> torch.Tensor:
    if path.lower().endswith(".npy"):
        return control.as_structure(torch.from_numpy(raw), latent_hw)
    return control.mask_to_structure(torch.from_numpy(raw), latent_hw)


def parse_classes(values, names: list[str], num_classes: int) -> list[int]:
    ids = []
    for v in values:
        if v.lstrip("-").isdigit():
            c = int(v)
        elif v in names:
            c = names.index(v)
        else:
            raise ValueError(f"unknown class {v!r}: use an id in [0, {num_classes}) or one of {names}")
        if not 0 <= c < num_classes:
            raise ValueError(f"class id {c} out of range [0, {num_classes})")
        ids.append(c)
    return ids


# ------------------------------------------------------------------------------------------------------ outputs
def write_npz(path: str | Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """images (B, 3, H, W) in [-1, 1] -> `path` with images uint8 [B, H, W, 3] and labels int64 [B], atomically."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    atomic_write(path, lambda f: np.savez(f, images=arr, labels=labels.numpy().astype(np.int64)))


# ------------------------------------------------------------------------------------------------------ command
def parse(argv: list[str] | None) -> tuple[SampleCommand, ControlOptions, SampleConfig]:
    """argv -> the three validated dataclasses (raises ValueError / UsageError on a bad option or value)."""
    ap = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(ap, SampleCommand)
    add_dataclass_args(ap, SampleConfig, aliases={"gumbel_split": ("--gumbel",)}, helps=SAMPLER_HELP,
                       group="sampler settings (nvg.sample.SampleConfig)")
    add_dataclass_args(ap, ControlOptions, group="structure control")
    ns = ap.parse_args(argv)
    return (dataclass_from_args(SampleCommand, ns), dataclass_from_args(ControlOptions, ns),
            dataclass_from_args(SampleConfig, ns))


def main(argv: list[str] | None = None) -> dict:
    cmd, ctl, sc = parse(argv)
    # every path and value is checked before the model is loaded
    check_input_path(cmd.ckpt, "generator checkpoint")
    ref_arrays = [read_rgb(p) for p in ctl.references] if ctl.references else None
    raw_map = read_structure_source(check_input_path(ctl.structure_map, "structure map", "file")) \
        if ctl.structure_map else None
    check_output_path(cmd.out, OUT_SUFFIXES, "--out")
    if cmd.stages:
        check_output_path(cmd.stages, (".png",), "--stages")
    ckpt = checkpoint.open_checkpoint(cmd.ckpt, "generator")
    try:
        gcfg = GeneratorConfig(**ckpt.config["model"])
    except (KeyError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{ckpt.path}: config.json has no valid generator model ({e})") from None
    names = ckpt.config.get("class_names") or []
    classes = parse_classes(cmd.classes, names, gcfg.num_classes) if cmd.classes else list(range(gcfg.num_classes))
    S = gcfg.num_stages
    if ctl.structure_from and ctl.structure_stages > S:
        raise ValueError(f"--structure-stages must be in [1, {S}] for this generator, got {ctl.structure_stages}")
    if ctl.regenerate_from and ctl.keep_stages >= S:
        raise ValueError(f"--keep-stages must be in [1, {S - 1}] for this generator, got {ctl.keep_stages}")
    maps = as_structure(raw_map, ctl.structure_map, tuple(gcfg.latent_hw)) if raw_map is not None else None

    model, tok, _ = load_generator(ckpt.path, ema=None if cmd.ema else False, device=cmd.device)
    sampler = Sampler(model, tok, fast=cmd.fast)
    y_all = torch.tensor(classes).repeat_interleave(cmd.n)
    refs = None
    if ref_arrays:
        refs = resize_images(ref_arrays, tok.config.image_size)
        refs = refs[torch.arange(len(y_all)) % len(refs)]
    images, first = [], None
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cmd.device.startswith("cuda") and cmd.bf16)
    for s in range(0, len(y_all), cmd.batch_size):
        y = y_all[s:s + cmd.batch_size].to(cmd.device)
        seed = cmd.seed + s // cmd.batch_size
        batch_refs = refs[s:s + cmd.batch_size].to(cmd.device) if refs is not None else None
        with amp:
            if ctl.regenerate_from:
                vgs = control.regenerate(sampler, batch_refs, ctl.keep_stages, y, ctl.keep_structure_only, sc, seed)
            elif ctl.structure_from:
                vgs = control.structure_transfer(sampler, batch_refs, y, ctl.structure_stages, sc, seed)
            elif maps is not None:
                m = maps if maps.shape[0] == 1 else maps[torch.arange(s, s + len(y)) % maps.shape[0]]
                vgs = control.structure_guided(sampler, y, m.to(cmd.device), sc, seed)
            else:
                vgs = sampler.generate(y, sc, seed=seed)
        images.append(tok.decode(vgs.f_hat.float()).float().cpu())
        first = vgs if first is None else first
    images = torch.cat(images)
    scale = max(1, 128 // images.shape[-1])
    from ..train.common import save_image_grid  # atomic PNG writer

    if cmd.out.lower().endswith(".npz"):
        write_npz(cmd.out, images, y_all)
    else:
        save_image_grid(images, cmd.out, nrow=cmd.n, scale=scale)
    print(f"wrote {len(images)} samples of classes {classes} to {cmd.out}")
    result = {"images": str(cmd.out)}
    if cmd.stages:
        k = min(8, len(first.tokens[0]))
        sub = VGS([t[:k] for t in first.tokens], first.labels[:k], first.canvas[:k], first.f_hat[:k])
        save_image_grid(progression(tok, sub), cmd.stages, nrow=2 * S, scale=scale)
        print(f"wrote the per-stage progression (structure map, decoded canvas after each stage) to {cmd.stages}")
        result["stages"] = cmd.stages
    return result


if __name__ == "__main__":
    run(main, PROG)
