"""Pictures of a visual granularity sequence, shared by `python -m nvg.sample` and the demo page: the colour map of a
label map and the per-stage progression (structure map and decoded canvas after each stage)."""

from __future__ import annotations

import numpy as np
import torch

from ..quantizer import VGS


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
