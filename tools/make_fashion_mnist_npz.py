"""Regenerate nvg/data/fashion_mnist_10k.npz from Debian's `dataset-fashion-mnist` package.

    apt-get install -y dataset-fashion-mnist && python tools/make_fashion_mnist_npz.py

The file holds the whole t10k split of Fashion-MNIST (10,000 images, exactly 1,000 per class), reordered so that
rows [0, 8000) are the `train` split (the first 800 images of each class in the original file order) and rows
[8000, 10000) the `val` split (the last 200 of each class). Each split is shuffled with a fixed seed, so that any
prefix of it is a uniform random sample (evaluation uses prefixes). Keys: `x` uint8 [N,28,28], `y` uint8 [N].
Fashion-MNIST is (c) 2017 Zalando SE, MIT licence: see nvg/data/LICENSE-fashion-mnist.
"""
import argparse
import gzip
import os
import tempfile

import numpy as np

SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
TRAIN_PER_CLASS = 800  # of 1000 per class in t10k; the remaining 200 per class are the val split


def read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=SOURCE_DIR)
    default_out = os.path.join(os.path.dirname(__file__), "..", "nvg", "data", "fashion_mnist_10k.npz")
    p.add_argument("--out", default=default_out)
    args = p.parse_args()
    x = read_idx(os.path.join(args.source, "t10k-images-idx3-ubyte.gz"), 16).reshape(-1, 28, 28)
    y = read_idx(os.path.join(args.source, "t10k-labels-idx1-ubyte.gz"), 8)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,), (x.shape, y.shape)
    assert (np.bincount(y, minlength=10) == 1000).all(), np.bincount(y)

    rank = np.zeros_like(y, dtype=np.int64)  # position of each image within its class, in file order
    for c in range(10):
        rank[y == c] = np.arange(1000)
    rng = np.random.default_rng(0)
    train, val = np.flatnonzero(rank < TRAIN_PER_CLASS), np.flatnonzero(rank >= TRAIN_PER_CLASS)
    order = np.concatenate([rng.permutation(train), rng.permutation(val)])
    out = os.path.abspath(args.out)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, x=x[order], y=y[order])
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    print(f"wrote {out}: {os.path.getsize(out) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
