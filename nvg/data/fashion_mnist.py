"""Fashion-MNIST (Xiao et al. 2017; (c) 2017 Zalando SE, MIT licence, see LICENSE-fashion-mnist).

Two sources, both gray 28x28 images zero-padded to 32x32 (then resized when image_size != 32):
  * "fashion-mnist": the embedded fashion_mnist_10k.npz (the 10k t10k images; rows [0, 8000) are the `train` split,
    800 per class, rows [8000, 10000) the `val` split, 200 per class; see tools/make_fashion_mnist_npz.py).
  * "fashion-mnist-full": the 60k train / 10k test IDX files of the Debian package `dataset-fashion-mnist`
    (`train` = the 60k training images, `val` = the 10k test images).
"""
import functools
import gzip
import os

import numpy as np
import torch

from .tensor_dataset import ImageTensorDataset, pad_and_resize

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
EMBEDDED_NPZ = os.path.join(os.path.dirname(__file__), "fashion_mnist_10k.npz")
EMBEDDED_TRAIN = 8000  # rows [0, 8000) train, [8000, 10000) val
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@functools.lru_cache(maxsize=1)
def _embedded_arrays() -> tuple[np.ndarray, np.ndarray]:
    if not os.path.exists(EMBEDDED_NPZ):
        raise FileNotFoundError(f"the embedded dataset file {EMBEDDED_NPZ} is missing (regenerate it with "
                                "tools/make_fashion_mnist_npz.py)")
    with np.load(EMBEDDED_NPZ) as d:
        return d["x"], d["y"]


def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


@functools.lru_cache(maxsize=2)
def _debian_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    img_file, lab_file = (os.path.join(DEBIAN_DIR, f) for f in DEBIAN_FILES[split])
    if not (os.path.exists(img_file) and os.path.exists(lab_file)):
        raise FileNotFoundError(
            f"'fashion-mnist-full' needs the Debian/Ubuntu package dataset-fashion-mnist ({img_file} not found): "
            "install it with `sudo apt-get install -y dataset-fashion-mnist`, or use the embedded 'fashion-mnist'"
        )
    x = _read_idx(img_file, 16).reshape(-1, 28, 28)
    y = _read_idx(lab_file, 8)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{img_file} has {x.shape[0]} images but {lab_file} has {y.shape[0]} labels")
    return x, y


def _make(x: np.ndarray, y: np.ndarray, image_size: int) -> ImageTensorDataset:
    images = pad_and_resize(torch.from_numpy(np.array(x, copy=True)), 32, image_size)
    return ImageTensorDataset(images[:, None], torch.from_numpy(y.astype(np.int64)), CLASS_NAMES)


def load_fashion_mnist(split: str, image_size: int) -> ImageTensorDataset:
    """The embedded 10k subset: `train` 8000 images, `val` 2000 (disjoint, balanced)."""
    x, y = _embedded_arrays()
    rows = slice(0, EMBEDDED_TRAIN) if split == "train" else slice(EMBEDDED_TRAIN, None)
    return _make(x[rows], y[rows], image_size)


def load_fashion_mnist_full(split: str, image_size: int) -> ImageTensorDataset:
    """The full set from the Debian package: `train` 60k images, `val` the 10k test images."""
    return _make(*_debian_arrays(split), image_size)
