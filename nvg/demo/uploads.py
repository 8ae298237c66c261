"""Uploads from the demo page: images and drawn masks arrive as data URLs (`data:image/png;base64,...`).

Every failure is a ValueError whose message is shown on the page as is: not a data URL, not an image, a file over
MAX_BYTES, an image over MAX_SIDE pixels on a side (checked from the header, before the pixels are decoded), a
truncated file. Images of any bit depth and mode are read like files (`nvg.data.images.to_rgb_array`, the core of
`read_rgb`); what was changed on the way (16-bit rescaled, alpha dropped, cropped to a square, resized) is returned
as notes for the page.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.images import GRAY16, to_rgb_array

MAX_BYTES = 10 * 1024 * 1024  # one uploaded file
MAX_SIDE = 4096  # pixels on either side


def data_url_bytes(url: object, what: str) -> bytes:
    """The payload of a base64 data URL (the page's FileReader.readAsDataURL / canvas.toDataURL output)."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url[:200]:
        raise ValueError(f"{what}: expected an uploaded file (a base64 data URL)")
    payload = url.split(",", 1)[1]
    if len(payload) > (MAX_BYTES * 4) // 3 + 8:
        raise ValueError(f"{what}: the file is larger than {MAX_BYTES // (1024 * 1024)} MB")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: the upload is not valid base64 data") from None
    if not data:
        raise ValueError(f"{what}: the file is empty")
    if len(data) > MAX_BYTES:
        raise ValueError(f"{what}: the file is larger than {MAX_BYTES // (1024 * 1024)} MB")
    return data


def read_upload(url: object, what: str) -> tuple[np.ndarray, list[str]]:
    """A data URL -> (uint8 RGB [H, W, 3], notes about what was converted)."""
    data = data_url_bytes(url, what)
    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            w, h = img.size
            if w > MAX_SIDE or h > MAX_SIDE:
                raise ValueError(f"{what}: the image is {w}x{h} pixels, larger than the {MAX_SIDE}x{MAX_SIDE} limit")
            if w < 1 or h < 1:
                raise ValueError(f"{what}: the image has no pixels")
            img.load()
            mode = img.mode
            if mode in GRAY16 + ("I",):
                notes.append(f"{what}: 16-bit image rescaled to 8 bits")
            elif mode == "F":
                notes.append(f"{what}: floating-point image scaled from [0, 1] to 8 bits")
            if "A" in mode or (mode == "P" and "transparency" in img.info):
                notes.append(f"{what}: transparency (alpha channel) dropped")
            rgb = to_rgb_array(img, what)
    except UnidentifiedImageError:
        raise ValueError(f"{what}: not an image file (PNG, JPEG, WebP, BMP, GIF, TIFF... expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{what}: the image is larger than the {MAX_SIDE}x{MAX_SIDE} limit") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"{what}: cannot read the image ({e})") from None
    return rgb, notes


def to_model_input(rgb: np.ndarray, size: int, what: str) -> tuple[torch.Tensor, list[str]]:
    """uint8 RGB [H, W, 3] -> (3, size, size) in [-1, 1]: centre-cropped to a square, resized with Lanczos."""
    h, w = rgb.shape[:2]
    notes = []
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        rgb = rgb[top:top + s, left:left + s]
        notes.append(f"{what}: centre-cropped from {w}x{h} to {s}x{s}")
    if rgb.shape[0] != size:
        notes.append(f"{what}: resized from {rgb.shape[0]} to {size} pixels")
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.LANCZOS))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1, notes


def read_mask(url: object) -> torch.Tensor:
    """The drawn mask (a data URL of the canvas) -> float luminance (H, W) in 0..255; refuses a blank canvas."""
    rgb, _ = read_upload(url, "mask")
    gray = torch.from_numpy(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    if float(gray.max() - gray.min()) < 1:
        raise ValueError("mask: the canvas is blank; draw the shape to keep apart from the rest first")
    return gray


def png_data_url(image: torch.Tensor) -> str:
    """(3, H, W) in [-1, 1] -> a PNG data URL."""
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
