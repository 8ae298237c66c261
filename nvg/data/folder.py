"""An ImageNet-layout folder (one sub-folder per class) with the official NVG/VAR preprocessing.

Preprocessing (as in VAR's and NVG's `build_dataset`): resize the shorter side to round(1.125 * image_size) with
Lanczos, then a random image_size crop for `train` or a centre crop otherwise; no flip; scale to [-1, 1].
If the folder has a sub-folder named after the split (root/train, root/val), that one is used; otherwise the folder
itself holds the classes and both splits read the same files (they differ only in the crop).
Files are read by nvg.data.images.read_rgb: 16-bit and float images are rescaled to 8 bits, alpha is dropped.
"""
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import read_rgb
from .tensor_dataset import to_pm1

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
MID_RATIO = 1.125  # resize ratio before the crop (VAR/NVG `mid_reso`)


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Shorter side -> size, Lanczos; the longer side scales with int() truncation, as torchvision's Resize(int)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img.resize((new_w, new_h), Image.LANCZOS)


def crop(img: Image.Image, size: int, random: bool) -> Image.Image:
    """A size x size crop: uniformly random (torch RNG) or centred (torchvision's rounding)."""
    w, h = img.size
    if random:
        top = int(torch.randint(0, h - size + 1, ()).item())
        left = int(torch.randint(0, w - size + 1, ()).item())
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class ImageFolderDataset(Dataset):
    """Yields (image float32 [3,H,W] in [-1,1], label int); classes are the sorted sub-folder names.

    random_crop: random (True) or centre (False) crops; default: random for split "train" only."""

    def __init__(self, root: str, split: str = "train", image_size: int = 32, random_crop: bool | None = None):
        split_dir = os.path.join(root, split)
        if os.path.isdir(split_dir):
            root = split_dir
        elif any(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
            raise FileNotFoundError(f"{root} has train/val sub-folders but no {split!r} one")
        self.root, self.split, self.image_size = root, split, image_size
        self.random_crop = split == "train" if random_crop is None else random_crop
        self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.class_names:
            raise FileNotFoundError(f"{root} has no class sub-folders (expected ImageNet layout: <root>/<class>/*.jpg)")
        self.num_classes = len(self.class_names)
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), label))
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {root}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = Image.fromarray(read_rgb(path))  # 16-bit and float images rescaled, alpha dropped (nvg/data/images.py)
        img = resize_shorter_side(img, round(MID_RATIO * self.image_size))
        img = crop(img, self.image_size, random=self.random_crop)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return to_pm1(x), label
