"""`python -m nvg.sample`: class-conditional sampling and control from a trained generator checkpoint.

    python -m nvg.sample --ckpt runs/main/generator --classes 0 3 7 --n 4 --out samples.png --stages stages.png
    python -m nvg.sample --ckpt RUN --classes 1 --n 8 --out samples.npz            # images uint8 [N,H,W,3], labels
    python -m nvg.sample --ckpt RUN --classes 5 --structure-from ref.png --structure-stages 3   # structure transfer
    python -m nvg.sample --ckpt RUN --classes 5 --structure-map maps.npy           # user label maps (S', h, w)
    python -m nvg.sample --ckpt RUN --classes 5 --structure-map mask.png           # any mask -> balanced stage-1 map
    python -m nvg.sample --ckpt RUN --classes 2 --regenerate-from ref.png --keep-stages 3   # stage-wise regeneration
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from . import control
from ..train import common as T
from .loading import load_generator
from ..quantizer import VGS
from .sampler import SampleConfig, Sampler


def read_images(paths: list[str], size: int) -> torch.Tensor:
    """PNG/JPEG files -> (B, 3, size, size) in [-1, 1] (RGB, resized with Lanczos)."""
    from PIL import Image

    out = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((size, size), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def read_structure(path: str, latent_hw: tuple[int, int]) -> torch.Tensor:
    """.npy label maps (S', h, w) / (B, S', h, w), or an image mask -> nested maps (B, S', N)."""
    if path.endswith(".npy"):
        return control.as_structure(torch.from_numpy(np.load(path)), latent_hw)
    from PIL import Image

    mask = torch.from_numpy(np.asarray(Image.open(path).convert("L")).astype(np.float32))
    return control.mask_to_structure(mask, latent_hw)


def structure_image(labels_BN: torch.Tensor, stage: int, hw: tuple[int, int], size: int) -> torch.Tensor:
    """Colour map of a label map (B, N) -> (B, 3, size, size) in [-1, 1]: one hue per cluster, spread by the bits."""
    n = max(2**stage, 1)
    hue = (labels_BN.float() + 0.5) / n
    k = torch.tensor([0.0, 1 / 3, 2 / 3], device=labels_BN.device)
    rgb = 0.5 + 0.5 * torch.cos(2 * np.pi * (hue[..., None] + k))  # (B, N, 3)
    img = rgb.transpose(1, 2).reshape(-1, 3, *hw) * 2 - 1
    return torch.nn.functional.interpolate(img, size=(size, size), mode="nearest")


def progression(tok, vgs: VGS) -> torch.Tensor:
    """(B*(2S), 3, H, W): per stage the decoded canvas after the stage and the structure map it used, row by row."""
    stages = tok.decode_stages(vgs)
    size, hw = stages[0].shape[-1], tok.quantize.latent_hw
    rows = []
    for i, img in enumerate(stages):
        rows += [structure_image(vgs.labels[:, i], i, hw, size), img]
    return torch.stack(rows, 1).flatten(0, 1)


def parse_classes(values: list[str], names: list[str], num_classes: int) -> list[int]:
    ids = []
    for v in values:
        if v.lstrip("-").isdigit():
            c = int(v)
        elif v in names:
            c = names.index(v)
        else:
            raise SystemExit(f"unknown class {v!r}: use an id in [0, {num_classes}) or one of {names}")
        if not 0 <= c < num_classes:
            raise SystemExit(f"class id {c} out of range [0, {num_classes})")
        ids.append(c)
    return ids


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m nvg.sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="generator run directory or checkpoint directory")
    ap.add_argument("--classes", nargs="+", default=None, help="class ids or names (default: all classes)")
    ap.add_argument("--n", type=int, default=4, help="samples per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="samples.png", help=".png grid (one row per class) or .npz (images, labels)")
    ap.add_argument("--stages", default=None, help="also write the per-stage progression strip to this PNG")
    ap.add_argument("--content-cfg", type=float, nargs=2, default=(1.0, 3.5), metavar=("START", "END"))
    ap.add_argument("--structure-cfg", type=float, nargs=2, default=(1.0, 2.5), metavar=("START", "END"))
    ap.add_argument("--top-p", type=float, nargs=2, default=(1.0, 0.5), metavar=("START", "END"))
    ap.add_argument("--top-k", type=int, default=0, help="0 = off, 1 = argmax")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--structure-steps", type=int, default=25)
    ap.add_argument("--gumbel", action="store_true", help="Gumbel top-k splits instead of deterministic top-k")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    ap.add_argument("--fast", action="store_true", help="torch.compile the transformer passes (same outputs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-bf16", action="store_true", help="fp32 on a GPU (default there: bf16 autocast, as official)")
    ap.add_argument("--structure-from", nargs="+", default=None, help="reference image(s): reuse their label maps")
    ap.add_argument("--structure-map", default=None, help=".npy nested label maps or a mask image")
    ap.add_argument("--structure-stages", type=int, default=3, help="stages of reference structure to keep")
    ap.add_argument("--regenerate-from", nargs="+", default=None, help="reference image(s) for stage-wise regeneration")
    ap.add_argument("--keep-stages", type=int, default=3, help="keep stages < this of the reference")
    ap.add_argument("--keep-structure-only", action="store_true", help="regeneration keeps only the structure")
    a = ap.parse_args(argv)
    if a.n < 1 or a.batch_size < 1:
        raise SystemExit("--n and --batch-size must be >= 1")
    model, tok, config = load_generator(a.ckpt, ema=False if a.no_ema else None, device=a.device)
    names = config.get("class_names") or []
    nc = model.config.num_classes
    classes = parse_classes(a.classes, names, nc) if a.classes else list(range(nc))
    sampler = Sampler(model, tok.quantize, fast=a.fast)
    sc = SampleConfig(content_cfg=tuple(a.content_cfg), structure_cfg=tuple(a.structure_cfg), top_p=tuple(a.top_p),
                      top_k=a.top_k, temperature=a.temperature, structure_steps=a.structure_steps,
                      gumbel_split=a.gumbel)
    y_all = torch.tensor(classes).repeat_interleave(a.n)
    refs = None
    if a.structure_from or a.regenerate_from:
        refs = read_images(a.structure_from or a.regenerate_from, tok.config.image_size)
        refs = refs[torch.arange(len(y_all)) % len(refs)]
    maps = read_structure(a.structure_map, model.config.latent_hw) if a.structure_map else None
    images, seqs = [], []
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.device.startswith("cuda") and not a.no_bf16)
    for s in range(0, len(y_all), a.batch_size):
        y = y_all[s:s + a.batch_size].to(a.device)
        seed = a.seed + s // a.batch_size
        batch_refs = refs[s:s + a.batch_size].to(a.device) if refs is not None else None
        with amp:
            if a.regenerate_from:
                vgs = control.regenerate(sampler, tok, batch_refs, a.keep_stages, y, a.keep_structure_only, sc, seed)
            elif a.structure_from:
                vgs = control.structure_transfer(sampler, tok, batch_refs, y, a.structure_stages, sc, seed)
            elif maps is not None:
                m = maps if maps.shape[0] == 1 else maps[torch.arange(s, s + len(y)) % maps.shape[0]]
                vgs = control.structure_guided(sampler, y, m.to(a.device), sc, seed)
            else:
                vgs = sampler.generate(y, sc, seed=seed)
        images.append(tok.decode(vgs.f_hat.float()).float().cpu())
        seqs.append(vgs)
    images = torch.cat(images)
    out = Path(a.out)
    if out.suffix == ".npz":
        arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, images=arr, labels=y_all.numpy().astype(np.int64))
    else:
        T.save_image_grid(images, out, nrow=a.n, scale=max(1, 128 // images.shape[-1]))
    print(f"wrote {len(images)} samples of classes {classes} to {out}")
    result = {"images": str(out)}
    if a.stages:
        first = seqs[0]
        k = min(8, len(first.tokens[0]))
        sub = VGS([t[:k] for t in first.tokens], first.labels[:k], first.canvas[:k], first.f_hat[:k])
        T.save_image_grid(progression(tok, sub), a.stages, nrow=2 * model.config.num_stages,
                          scale=max(1, 128 // images.shape[-1]))
        print(f"wrote the per-stage progression (structure map, decoded canvas after each stage) to {a.stages}")
        result["stages"] = a.stages
    return result


if __name__ == "__main__":
    main()
