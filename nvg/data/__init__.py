"""Datasets for NVG. Every dataset yields (image float32 [3,H,W] in [-1,1], label int) and has `num_classes` and
`class_names`. Nothing is downloaded.

    from nvg.data import load_dataset
    ds = load_dataset("fashion-mnist", split="train", image_size=32)
"""
import os

from torch.utils.data import Dataset

from .fashion_mnist import load_fashion_mnist, load_fashion_mnist_full
from .folder import ImageFolderDataset
from .shapes import ShapesDataset
from .tensor_dataset import ImageTensorDataset

__all__ = ["load_dataset", "DATASET_NAMES", "SPLITS", "ImageTensorDataset", "ImageFolderDataset", "ShapesDataset"]

DATASET_NAMES = ("fashion-mnist", "fashion-mnist-full", "shapes")
SPLITS = ("train", "val")
MIN_SIZE, MAX_SIZE = 8, 1024


def load_dataset(name: str, split: str = "train", image_size: int = 32) -> Dataset:
    """Load a dataset by name or folder path.

    Args:
        name: "fashion-mnist" (embedded 10k subset: train 8000 / val 2000), "fashion-mnist-full" (the Debian package
            dataset-fashion-mnist: train 60k / val 10k), "shapes" (procedural RGB toy set, train 10k / val 2k),
            or the path of an ImageNet-layout folder (one sub-folder per class, optionally under train/ and val/).
        split: "train" or "val". Folder datasets random-crop for "train" and centre-crop for "val".
        image_size: output height = width in pixels (8..1024). Fashion-MNIST is padded 28 -> 32, then resized.
    Returns:
        a map-style Dataset of (float32 [3, image_size, image_size] in [-1, 1], int label).
    """
    if not isinstance(name, str | os.PathLike):
        raise TypeError(f"dataset name must be a string or path, got {type(name).__name__}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not MIN_SIZE <= image_size <= MAX_SIZE:
        raise ValueError(f"image_size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {image_size!r}")
    if name == "fashion-mnist":
        return load_fashion_mnist(split, image_size)
    if name == "fashion-mnist-full":
        return load_fashion_mnist_full(split, image_size)
    if name == "shapes":
        return ShapesDataset(split, image_size)
    if os.path.isdir(name):
        return ImageFolderDataset(os.fspath(name), split, image_size)
    raise ValueError(f"unknown dataset {name!r}: expected one of {DATASET_NAMES} or an existing folder path")
