"""Procedural coloured shapes: 10 classes of RGB images, rendered on access, deterministic from (seed, split, index).

Each image is one shape (random half-size 0.22-0.38 of the canvas, random position, bright foreground colour) on a dark
random background with Gaussian pixel noise (sigma 6 on the 0-255 scale). Label = index % 10, so every split is
balanced. Nothing is stored: a toy set for tests and the RGB code path, not a benchmark.
"""
import numpy as np
import torch
from torch.utils.data import Dataset

from .tensor_dataset import to_pm1

CLASS_NAMES = ["disk", "square", "triangle", "ring", "plus", "hbar", "vbar", "diamond", "x", "checker"]
SPLIT_IDS = {"train": 0, "val": 1}


def _mask(label: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean mask of shape `label` in coordinates normalised by the half-size (the shape fills about [-1, 1]^2)."""
    ax, ay = np.abs(dx), np.abs(dy)
    r2 = dx * dx + dy * dy
    if label == 0:  # disk
        return r2 <= 1.0
    if label == 1:  # square
        return np.maximum(ax, ay) <= 0.8
    if label == 2:  # triangle, apex up
        return (dy <= 0.8) & (ax <= 0.9 * (dy + 0.8) / 1.6)
    if label == 3:  # ring
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if label == 4:  # plus
        return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    if label == 5:  # horizontal bar
        return (ay <= 0.3) & (ax <= 1.0)
    if label == 6:  # vertical bar
        return (ax <= 0.3) & (ay <= 1.0)
    if label == 7:  # diamond
        return ax + ay <= 1.0
    if label == 8:  # x
        return ((np.abs(dx - dy) <= 0.4) | (np.abs(dx + dy) <= 0.4)) & (np.maximum(ax, ay) <= 0.85)
    # checker: a 3x3 checkerboard
    cells = np.floor((dx + 0.9) / 0.6) + np.floor((dy + 0.9) / 0.6)
    return (np.maximum(ax, ay) <= 0.9) & (cells % 2 == 0)


def render_shape(label: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One image, uint8 [3, image_size, image_size]."""
    half = rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(half, 1.0 - half, size=2)
    bg = rng.uniform(0, 80, size=3)
    fg = rng.uniform(150, 255, size=3)
    t = (np.arange(image_size) + 0.5) / image_size  # pixel centres in (0, 1)
    dx, dy = (t[None, :] - cx) / half, (t[:, None] - cy) / half
    m = _mask(label, dx, dy)[None]
    img = np.where(m, fg[:, None, None], bg[:, None, None]) + rng.normal(0.0, 6.0, size=(3, image_size, image_size))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


class ShapesDataset(Dataset):
    """Yields (image float32 [3,H,W] in [-1,1], label int); `train` has 10,000 images and `val` 2,000 by default."""

    def __init__(self, split: str = "train", image_size: int = 32, length: int | None = None, seed: int = 0):
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown split {split!r} for 'shapes': expected one of {sorted(SPLIT_IDS)}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.length = length if length is not None else (10_000 if split == "train" else 2_000)
        self.class_names = list(CLASS_NAMES)
        self.num_classes = len(CLASS_NAMES)

    def __len__(self) -> int:
        return self.length

    @property
    def labels(self) -> torch.Tensor:
        return torch.arange(self.length) % 10

    def image_uint8(self, i: int) -> np.ndarray:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a shapes dataset of {self.length} images")
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], i])
        return render_shape(i % 10, self.image_size, rng)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_pm1(torch.from_numpy(self.image_uint8(i))), i % 10
