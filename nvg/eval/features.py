"""Frozen feature networks for sample and tokenizer evaluation (FD-proxy CNN, Inception-v3), the image batches
they read, and where reference features are cached. Nothing is downloaded."""
import hashlib
import os

import torch
from torch.utils.data import DataLoader, Dataset

from .fd_proxy import WEIGHTS_PATH, load_proxy_cnn
from .inception import InceptionFeatures


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("NVG_CACHE_DIR") or os.path.join(base, "nvg")


def batches(source, batch_size: int):
    """Float [B,C,H,W] batches in [-1,1] from a uint8 tensor [N,C,H,W], a float tensor, or a Dataset."""
    if isinstance(source, torch.Tensor):
        for i in range(0, source.shape[0], batch_size):
            x = source[i : i + batch_size]
            yield x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
    elif isinstance(source, Dataset):
        for x, _ in DataLoader(source, batch_size=batch_size, shuffle=False):
            yield x
    else:
        raise TypeError(f"expected an image tensor or a Dataset, got {type(source).__name__}")


class FeatureNet:
    """A frozen feature extractor: `name` for reports, `key` for the cache, `fn(float images) -> [B,D]`."""

    def __init__(self, name: str, key: str, fn, device):
        self.name, self.key, self.fn, self.device = name, key, fn, torch.device(device)

    @torch.inference_mode()
    def __call__(self, source, batch_size: int = 100) -> torch.Tensor:
        from tqdm.auto import tqdm

        total = -(-len(source) // batch_size)
        bar = tqdm(batches(source, batch_size), total=total, desc=self.key, leave=False, disable=None)  # TTY only
        return torch.cat([self.fn(x.to(self.device)).float().cpu() for x in bar])


def proxy_net(device="cpu") -> tuple[FeatureNet, torch.nn.Module]:
    cnn = load_proxy_cnn(device=device)
    with open(WEIGHTS_PATH, "rb") as f:
        key = "fdproxy-" + hashlib.sha1(f.read()).hexdigest()[:10]
    return FeatureNet("FD-proxy (not FID)", key, cnn.features, device), cnn


def inception_net(device="cpu") -> FeatureNet:
    return FeatureNet("FID (Inception-v3 2015-12-05)", "incv3-20151205", InceptionFeatures(device), device)
