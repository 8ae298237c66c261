"""Controlled generation with NVG (paper §3.1-3.2, Fig. 1d, 6, 8; spec §7).

* structure-guided generation: user-supplied nested label maps replace the sampled structure of the first stages;
* structure transfer: the label maps of reference images steer generation of (other) classes;
* stage-wise regeneration: keep the content and structure of stages < i of a reference image, generate the rest,
  optionally for another class.
All three are the same sampler loop with fixed label maps and/or fixed tokens (`Sampler.generate(structure=,
tokens=)`). Label maps must be nested (child 2p / 2p+1 of parent p) and equal-sized (the method splits every cluster
into two halves); `mask_to_structure` turns any soft mask into a valid stage-1 map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quantizer import VGS
from ..structure import check_nested, split_clusters
from .sampler import SampleConfig, Sampler


def as_structure(maps: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """User label maps (B, S', h, w), (S', h, w) or (B, S', N) -> checked long (B, S', N).

    Raises ValueError naming the problem when the maps do not fit the latent grid, are not nested or not equal-sized.
    """
    maps = torch.as_tensor(maps)
    h, w = latent_hw
    if maps.dim() == 3 and maps.shape[-2:] == (h, w):
        maps = maps[None]
    if maps.dim() == 4:
        if maps.shape[-2:] != (h, w):
            raise ValueError(f"label maps must be {h}x{w} (the latent grid), got {tuple(maps.shape[-2:])}")
        maps = maps.flatten(-2)
    if maps.dim() != 3 or maps.shape[-1] != h * w:
        raise ValueError(f"label maps must be (B, stages, {h}, {w}) or (B, stages, {h * w}), got {tuple(maps.shape)}")
    if maps.dtype.is_floating_point:
        if not torch.equal(maps, maps.round()):
            raise ValueError("label maps must hold integer cluster ids")
        maps = maps.long()
    check_nested(maps, "label maps")
    return maps.long()


def mask_to_structure(mask: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """A soft or binary mask (B, H, W) or (H, W) -> nested maps (B, 2, N) of stages 0 and 1: the half of the latent
    positions with the largest (area-resized) mask values becomes cluster 1, the rest cluster 0 (equal halves)."""
    m = torch.as_tensor(mask).float()
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3:
        raise ValueError(f"mask must be (H, W) or (B, H, W), got {tuple(m.shape)}")
    small = F.interpolate(m[:, None], size=latent_hw, mode="area")[:, 0].flatten(1)  # (B, N)
    values = (small - small.mean(1, keepdim=True)) / (small.std(1, keepdim=True) + 1e-6)
    # deterministic tie-break (binary masks give many equal values): earlier positions (row-major) win
    values = values.clamp(-1, 1) * 0.99 - 1e-3 * torch.arange(values.shape[1]) / values.shape[1]
    stage0 = torch.zeros_like(small, dtype=torch.long)
    return torch.stack([stage0, split_clusters(stage0, values, 0)], 1)


@torch.no_grad()
def structure_guided(sampler: Sampler, classes: Tensor, structure: Tensor, sc: SampleConfig | None = None,
                     seed: int | None = None) -> VGS:
    """Generate `classes` (B,) following fixed label maps `structure` (B or 1, S', h, w / N) for stages 0..S'-1."""
    maps = as_structure(structure, sampler.model.config.latent_hw)
    classes = torch.as_tensor(classes)
    if maps.shape[0] == 1 and classes.shape[0] > 1:
        maps = maps.expand(classes.shape[0], -1, -1)
    if maps.shape[0] != classes.shape[0]:
        raise ValueError(f"{maps.shape[0]} label-map sets for {classes.shape[0]} classes")
    return sampler.generate(classes, sc, seed=seed, structure=maps)


@torch.no_grad()
def structure_transfer(sampler: Sampler, images: Tensor, classes: Tensor, stages: int = 3,
                       sc: SampleConfig | None = None, seed: int | None = None) -> VGS:
    """Reuse the label maps of stages 0..stages-1 of reference images (B, 3, H, W), encoded by the sampler's tokenizer,
    to generate `classes` (B,)."""
    ref = encode_references(sampler, images)
    S = sampler.model.config.num_stages
    if not 1 <= stages <= S:
        raise ValueError(f"stages must be in [1, {S}], got {stages}")
    return structure_guided(sampler, classes, ref.labels[:, :stages], sc, seed)


@torch.no_grad()
def regenerate(sampler: Sampler, images: Tensor, keep_stages: int, classes: Tensor, keep_structure_only: bool = False,
               sc: SampleConfig | None = None, seed: int | None = None) -> VGS:
    """Stage-wise regeneration: keep stages < keep_stages (content and structure, or the structure only) of each
    reference image's sequence (encoded by the sampler's tokenizer) and generate the remaining stages for `classes`
    (B,) (same or other classes)."""
    ref = encode_references(sampler, images)
    S = sampler.model.config.num_stages
    if not 1 <= keep_stages < S:
        raise ValueError(f"keep_stages must be in [1, {S - 1}], got {keep_stages}")
    tokens = None if keep_structure_only else ref.tokens[:keep_stages]
    return sampler.generate(torch.as_tensor(classes), sc, seed=seed, structure=ref.labels[:, :keep_stages],
                            tokens=tokens)


def encode_references(sampler: Sampler, images: Tensor) -> VGS:
    """Reference images (B, 3, H, W) in [-1, 1] -> their visual granularity sequences, by the sampler's tokenizer.
    Checked first, so that a call in the older form (a tokenizer where the images now go) gets a clear error."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        what = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"reference images must be a tensor (B, 3, H, W), got {what} (the tokenizer is the "
                         f"sampler's: no tokenizer argument)")
    return sampler.tokenizer.encode(images.to(sampler.quantizer.embedding.weight.device))
