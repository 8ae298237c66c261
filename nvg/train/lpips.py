"""LPIPS perceptual distance (Zhang et al., CVPR 2018; VGG16 variant, as in the official NVG AE loss), built from
weight files the user supplies: nothing is downloaded.

Expected weights (one file, or two given as "vgg_file,lin_file"; torch.save'd state dicts or .safetensors):
- VGG16 convolutions, either torchvision's layout `features.{i}.weight/bias` (i = 0, 2, 5, ..., 28) or the lpips
  package's `net.slice{k}.{i}.weight/bias`;
- the five linear heads of the lpips package's `vgg.pth`: `lin{0..4}.model.1.weight` (1, C, 1, 1).

d(x, y) = sum over relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of mean_hw( w_l . (n(phi_l(x)) - n(phi_l(y)))^2 ),
n = unit-normalisation over channels, inputs in [-1, 1] shifted/scaled as the lpips package does.
Modified from: github.com/richzhang/PerceptualSimilarity (lpips/pretrained_networks.py, lpips/lpips.py).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from torch import Tensor

# VGG16 "D" configuration up to relu5_3: conv widths, "M" = 2x2 max-pool; taps after these feature indices
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_WIDTHS = (64, 128, 256, 512, 512)


def _load_any(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in _WIDTHS])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, spec: str) -> LPIPS:
        """Build from "file" or "vgg_file,lin_file" (see the module docstring); raises naming a missing key."""
        sd: dict[str, Tensor] = {}
        for path in spec.split(","):
            sd.update(_load_any(path.strip()))
        ours: dict[str, Tensor] = {}
        for k, v in sd.items():
            m = re.fullmatch(r"(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)", k)
            if m:
                ours[f"features.{m[1]}.{m[2]}"] = v
            m = re.fullmatch(r"lin(\d)\.model\.1\.weight", k)
            if m:
                ours[f"lins.{m[1]}.weight"] = v
        model = cls()
        expected = {k: v for k, v in model.state_dict().items() if k not in ("shift", "scale")}
        missing = [k for k in expected if k not in ours]
        if missing:
            raise KeyError(f"LPIPS weights in {spec!r} lack {len(missing)} tensors, e.g. {missing[0]!r} "
                           "(need VGG16 features.* and lpips lin*.model.1.weight)")
        for k, v in expected.items():
            if ours[k].shape != v.shape:
                raise ValueError(f"LPIPS weight {k!r}: shape {tuple(ours[k].shape)} != expected {tuple(v.shape)}")
        model.load_state_dict({**ours, "shift": model.shift, "scale": model.scale})
        return model

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image distance (B,) between images in [-1, 1]."""
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total = 0.0
        start = 0
        for tap, lin in zip(_TAPS, self.lins):
            for layer in self.features[start : tap + 1]:
                h = layer(h)
            start = tap + 1
            fx, fy = (t / (t.square().sum(1, keepdim=True).sqrt() + 1e-10) for t in h.chunk(2))
            total = total + lin((fx - fy).square()).mean((1, 2, 3))
        return total
