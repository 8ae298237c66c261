"""The one image reader: any image file PIL opens -> uint8 RGB [H, W, 3], whatever its bit depth.

PIL's `convert("RGB")` clips 16- and 32-bit gray images ("I;16*", "I") to 255 instead of rescaling them, so a
16-bit PNG reads as white. `read_rgb` rescales instead:

* 8-bit gray / RGB, palette, 1-bit, CMYK, YCbCr: as PIL converts them;
* 16-bit gray ("I;16", "I;16B", "I;16L", "I;16N"): v / 257, rounded (65535 -> 255, 32896 -> 128);
* 32-bit integer gray ("I", how some readers open 16-bit files): taken as 16-bit, so values must lie in 0..65535;
* float gray ("F"): taken as [0, 1] (values a hair outside are clipped; others are an error: the range is unknown);
* 16-bit RGB / RGBA / gray+alpha PNGs: PIL itself reads them at 8 bits (the high byte), which is a correct rescale;
* alpha (LA, RGBA, PA, transparent palettes) is dropped, not composited: the colour channels as stored, as PIL's
  `convert("RGB")` and the official NVG/VAR preprocessing do.

Errors: FileNotFoundError for a missing file; ValueError naming the file for anything else (not an image, truncated,
an unsupported mode or value range).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

GRAY16 = ("I;16", "I;16B", "I;16L", "I;16N")
F_TOLERANCE = 1 / 255  # how far outside [0, 1] a float image may stray before it is refused


def _gray_to_u8(img: Image.Image, path) -> np.ndarray:
    a = np.asarray(img)
    if img.mode in GRAY16:
        return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
    if img.mode == "I":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"{path}: 32-bit integer image with values in [{lo}, {hi}]; only 0..65535 (16-bit) "
                             "is understood")
        return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
    # "F"
    a = a.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(a).all() or lo < -F_TOLERANCE or hi > 1 + F_TOLERANCE:
        raise ValueError(f"{path}: float image with values in [{lo:g}, {hi:g}]; only [0, 1] is understood")
    return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)


def to_rgb_array(img: Image.Image, path: str | os.PathLike = "image") -> np.ndarray:
    """An opened PIL image -> uint8 RGB [H, W, 3] (see the module docstring for each mode)."""
    if img.mode in GRAY16 + ("I", "F"):
        g = _gray_to_u8(img, path)
        return np.repeat(g[..., None], 3, axis=2)
    try:
        rgb = img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot convert an image of mode {img.mode!r} to RGB ({e})") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3]; 16-bit, 32-bit and float images are rescaled, not clipped."""
    if not os.path.exists(path):
        raise FileNotFoundError(2, "no such image file", os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(21, "is a directory, expected an image file", os.fspath(path))
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb_array(img, path)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file (PIL cannot identify it)") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data; PermissionError is an OSError too
        if isinstance(e, PermissionError):
            raise
        raise ValueError(f"{path}: cannot read the image ({e})") from None


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """An image file as float32 luminance [H, W] in 0..255 (ITU-R 601 weights, as PIL's "L"), via read_rgb."""
    rgb = read_rgb(path).astype(np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
