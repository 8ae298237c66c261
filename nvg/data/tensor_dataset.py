"""A map-style dataset over a uint8 image tensor held in memory (decoded once)."""
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


def to_pm1(u8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, H, W] in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1, as VAR's ToTensor + 2x-1)."""
    return u8.float().div_(127.5).sub_(1.0)


def pad_and_resize(x_NHW: torch.Tensor, pad_to: int, image_size: int, chunk: int = 4096) -> torch.Tensor:
    """Zero-pad uint8 gray images [N,h,w] centrally to pad_to x pad_to, then resize to image_size (bilinear with
    antialiasing, rounded back to uint8) when image_size differs from pad_to.

    Returns:
        uint8 [N, image_size, image_size].
    """
    n, h, w = x_NHW.shape
    if h > pad_to or w > pad_to:
        raise ValueError(f"images of {h}x{w} px do not fit a {pad_to}x{pad_to} pad")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    x = F.pad(x_NHW, (left, pad_to - w - left, top, pad_to - h - top))
    if image_size == pad_to:
        return x.contiguous()
    out = torch.empty(n, image_size, image_size, dtype=torch.uint8)
    for i in range(0, n, chunk):
        xi = x[i : i + chunk, None].float()
        yi = F.interpolate(xi, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + chunk] = yi[:, 0].round_().clamp_(0, 255).to(torch.uint8)
    return out


class ImageTensorDataset(Dataset):
    """Yields (image float32 [3,H,W] in [-1,1], label int).

    Attributes:
        images: uint8 [N, C, H, W] with C = 1 (gray, repeated to 3 channels on access) or 3.
        labels: int64 [N].
        num_classes, class_names: the label set.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N,1|3,H,W], got {images.dtype} {list(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N={images.shape[0]}], got {list(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = to_pm1(self.images[i])
        if x.shape[0] == 1:
            x = x.repeat(3, 1, 1)
        return x, int(self.labels[i])
