"""FD-proxy: a small CNN trained on the embedded Fashion-MNIST train split, used as a fast feature extractor.

"FD-proxy (not FID)" is the Frechet distance between its 128-d penultimate features of two image sets. It is a
cheap, deterministic stand-in for FID during development and in CI; it is not comparable with FID numbers.
The classifier head also gives the class accuracy of class-conditional samples.

Input convention: images of any size in [-1, 1], gray [B,1,H,W] or RGB [B,3,H,W]. RGB is converted to gray by
averaging the channels (the training data is gray repeated to 3 channels, so this is exact on it), then resized to
32x32 (bilinear, antialiased) when needed. Weights: nvg/assets/fd_proxy_cnn.safetensors, made by
tools/train_fd_proxy.py (fixed seed; the recipe is in that file and in the weights' metadata), stored as
float16 and computed in float32.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "fd_proxy_cnn.safetensors")
INPUT_SIZE = 32
FEATURE_DIM = 128


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ProxyCNN(nn.Module):
    """conv32-pool-conv64-conv64-pool-conv128-pool-conv128-GAP -> 128 features -> linear 10 (0.28 M params)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            _block(1, 32), nn.MaxPool2d(2),  # 16x16
            _block(32, 64), _block(64, 64), nn.MaxPool2d(2),  # 8x8
            _block(64, 128), nn.MaxPool2d(2),  # 4x4
            _block(128, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B,1|3,H,W] in [-1,1] -> [B,128]."""
        return self.body(preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,1|3,H,W] in [-1,1] -> class logits [B,10]."""
        return self.head(self.features(x))


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """[B,1|3,H,W] float in [-1,1] -> gray [B,1,32,32] (channel mean, then bilinear antialiased resize if needed)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
        raise ValueError(f"FD-proxy CNN expects float images [B,1|3,H,W] in [-1,1], got {x.dtype} {list(x.shape)}")
    x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


def load_proxy_cnn(path: str | None = None, device: str | torch.device = "cpu") -> ProxyCNN:
    """The frozen FD-proxy CNN in eval mode (BatchNorm uses its stored running statistics)."""
    from safetensors.torch import load_file

    path = path or WEIGHTS_PATH
    if not os.path.exists(path):
        raise FileNotFoundError(f"FD-proxy weights {path} are missing: retrain them with tools/train_fd_proxy.py")
    model = ProxyCNN()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()})
    return model.eval().requires_grad_(False).to(device)


def read_metadata(path: str | None = None) -> dict:
    """The training recipe and validation accuracy stored with the weights."""
    from safetensors import safe_open

    with safe_open(path or WEIGHTS_PATH, "pt") as f:
        return dict(f.metadata() or {})
