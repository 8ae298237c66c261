import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nvg.data import fashion_mnist as fm
from nvg.data import load_dataset
from nvg.data.folder import crop, resize_shorter_side
from nvg.data.images import read_gray, read_rgb


def _check_item(ds, image_size):
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, image_size, image_size)
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert isinstance(y, int) and 0 <= y < ds.num_classes == len(ds.class_names)


def test_fashion_mnist_embedded_splits():
    train, val = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "val")
    assert (len(train), len(val)) == (8000, 2000)
    assert train.num_classes == 10 and train.class_names[0] == "T-shirt/top"
    _check_item(train, 32)
    assert torch.bincount(train.labels).tolist() == [800] * 10
    assert torch.bincount(val.labels).tolist() == [200] * 10
    # The splits are disjoint (no val image also appears in train).
    train_keys = {bytes(im.numpy()) for im in train.images}
    assert not any(bytes(im.numpy()) in train_keys for im in val.images)


def test_fashion_mnist_padding_and_gray_to_rgb():
    ds = load_dataset("fashion-mnist", "val", 32)
    x, _ = ds[5]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # 28 -> 32 zero padding: a 2-pixel black frame, and the centre equals the raw npz pixels.
    assert (x[:, :2] == -1).all() and (x[:, -2:] == -1).all() and (x[:, :, :2] == -1).all()
    raw = np.load(fm.EMBEDDED_NPZ)["x"][fm.EMBEDDED_TRAIN + 5]
    assert torch.equal(ds.images[5, 0, 2:30, 2:30], torch.from_numpy(raw))


@pytest.mark.parametrize("size", [16, 64])
def test_fashion_mnist_other_sizes(size):
    _check_item(load_dataset("fashion-mnist", "val", size), size)


def test_fashion_mnist_full(monkeypatch, tmp_path):
    if all(os.path.exists(os.path.join(fm.DEBIAN_DIR, f)) for f in fm.DEBIAN_FILES["val"]):
        ds = load_dataset("fashion-mnist-full", "val")
        assert len(ds) == 10_000 and torch.bincount(ds.labels).tolist() == [1000] * 10
        _check_item(ds, 32)
    # Without the Debian files the error names the apt command.
    fm._debian_arrays.cache_clear()
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist-full", "train")
    fm._debian_arrays.cache_clear()


def test_shapes_deterministic_balanced_rgb():
    a, b = load_dataset("shapes", "train"), load_dataset("shapes", "train")
    assert len(a) == 10_000 and len(load_dataset("shapes", "val")) == 2_000
    _check_item(a, 32)
    for i in (0, 7, 9999):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == i % 10
    assert not torch.equal(a[0][0], load_dataset("shapes", "val")[0][0])
    x = a[3][0]
    assert not torch.equal(x[0], x[1])  # coloured, not gray
    _check_item(load_dataset("shapes", "val", 24), 24)
    with pytest.raises(IndexError):
        a[10_000]


def _write_folder(root, sizes):
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for j, (w, h) in enumerate(sizes):
            rng = np.random.default_rng(10 * c + j)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{j}.png")


def test_folder_preprocessing(tmp_path):
    _write_folder(tmp_path, [(50, 40), (40, 60)])
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    val = load_dataset(str(tmp_path), "val", 16)
    assert val.class_names == ["cat", "dog"] and len(val) == 4
    _check_item(val, 16)
    # Centre crop after a Lanczos resize of the shorter side to round(1.125 * 16) = 18.
    img = Image.open(tmp_path / "cat" / "0.png").convert("RGB")
    resized = resize_shorter_side(img, 18)
    assert resized.size == (22, 18)
    ref = np.asarray(resized.crop((3, 1, 19, 17)), dtype=np.float32) / 127.5 - 1
    torch.testing.assert_close(val[0][0], torch.from_numpy(ref).permute(2, 0, 1))
    assert torch.equal(val[0][0], val[0][0])
    # Train split: random crops (different between draws, reproducible under a seed).
    train = load_dataset(str(tmp_path), "train", 16)
    torch.manual_seed(0)
    crops = [train[1][0] for _ in range(8)]
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    torch.manual_seed(0)
    assert torch.equal(train[1][0], crops[0])
    assert crop(resized, 18, random=True).size == (18, 18)


def test_folder_with_split_subfolders_and_errors(tmp_path):
    _write_folder(tmp_path / "train", [(32, 32)])
    ds = load_dataset(str(tmp_path), "train", 8)
    assert len(ds) == 2 and ds.num_classes == 2
    with pytest.raises(FileNotFoundError, match="'val'"):
        load_dataset(str(tmp_path), "val", 8)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        load_dataset(str(tmp_path / "empty"), "val", 8)
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "empty" / "a"), "val", 8)


def test_dataloader_batches():
    ds = load_dataset("fashion-mnist", "val")
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64


@pytest.mark.parametrize(
    "args, err, match",
    [
        (("imagenet-1k",), ValueError, "unknown dataset"),
        (("fashion-mnist", "test"), ValueError, "unknown split"),
        (("fashion-mnist", "train", 4), ValueError, "image_size"),
        (("fashion-mnist", "train", 32.0), ValueError, "image_size"),
        ((None,), TypeError, "dataset name"),
    ],
)
def test_bad_arguments(args, err, match):
    with pytest.raises(err, match=match):
        load_dataset(*args)


# ----------------------------------------------------------------------------------------------------------------------
# One image reader: every bit depth rescaled to uint8 RGB (nvg/data/images.py)
# ----------------------------------------------------------------------------------------------------------------------
def _write_png16(path, a):
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit RGB): uint16 [H,W] / [H,W,C], C = 2 (gray+alpha),
    3 (RGB) or 4 (RGBA)."""
    a = np.asarray(a, dtype=">u2")
    a = a[..., None] if a.ndim == 2 else a
    h, w, c = a.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_read_rgb_16bit_gray_is_rescaled_not_saturated(tmp_path):
    Image.fromarray(np.full((4, 6), 32896, np.uint16)).save(tmp_path / "mid.png")  # mode "I;16"
    assert Image.open(tmp_path / "mid.png").mode == "I;16"
    assert np.asarray(Image.open(tmp_path / "mid.png").convert("RGB")).max() == 255  # what PIL alone does
    x = read_rgb(tmp_path / "mid.png")
    assert x.dtype == np.uint8 and x.shape == (4, 6, 3) and (x == 128).all()
    ramp = np.array([[0, 257, 65535, 32767]], np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert read_rgb(tmp_path / "ramp.png")[0, :, 0].tolist() == [0, 1, 255, 127]
    _write_png16(tmp_path / "raw.png", np.full((3, 3), 0x8080))  # the same through the raw writer
    assert (read_rgb(tmp_path / "raw.png") == 128).all()


def test_read_rgb_16bit_colour_alpha_and_other_modes(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 32896, 0
    _write_png16(tmp_path / "rgb48.png", rgb)
    assert read_rgb(tmp_path / "rgb48.png")[0, 0].tolist() == [255, 128, 0]
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 0x4000, np.uint16)], -1)
    _write_png16(tmp_path / "rgba64.png", rgba)
    assert read_rgb(tmp_path / "rgba64.png")[0, 0].tolist() == [255, 128, 0]  # alpha dropped, not composited
    _write_png16(tmp_path / "la.png", np.stack([np.full((2, 2), 32896), np.zeros((2, 2))], -1))
    assert (read_rgb(tmp_path / "la.png") == 128).all()  # fully transparent: the gray value is kept
    Image.fromarray(np.full((2, 2), 30000, np.int32)).save(tmp_path / "i32.tif")  # mode "I"
    assert (read_rgb(tmp_path / "i32.tif") == round(30000 / 257)).all()
    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(tmp_path / "f.tif")  # mode "F", [0, 1]
    assert (read_rgb(tmp_path / "f.tif") == 128).all()
    Image.fromarray(np.full((2, 2), 200.0, np.float32)).save(tmp_path / "f255.tif")
    with pytest.raises(ValueError, match=r"only \[0, 1\]"):
        read_rgb(tmp_path / "f255.tif")
    Image.fromarray(np.full((2, 2), -5, np.int32)).save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match="0..65535"):
        read_rgb(tmp_path / "neg.tif")
    Image.new("1", (2, 2), 1).save(tmp_path / "bit.png")
    assert (read_rgb(tmp_path / "bit.png") == 255).all()
    Image.new("RGB", (2, 2), (10, 200, 30)).convert("P").save(tmp_path / "pal.png")
    assert read_rgb(tmp_path / "pal.png").shape == (2, 2, 3)
    Image.new("LA", (2, 2), (77, 0)).save(tmp_path / "la8.png")
    assert (read_rgb(tmp_path / "la8.png") == 77).all()
    assert read_gray(tmp_path / "rgb48.png")[0, 0] == pytest.approx(0.299 * 255 + 0.587 * 128, abs=0.01)


def test_read_rgb_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_rgb(tmp_path / "missing.png")
    with pytest.raises(IsADirectoryError):
        read_rgb(tmp_path)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        read_rgb(tmp_path / "text.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        read_rgb(tmp_path / "cut.png")


def test_folder_dataset_reads_16bit_png(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((20, 20), 32896, np.uint16)).save(tmp_path / name / "x.png")
    x, label = load_dataset(str(tmp_path), "val", 16)[1]
    assert label == 1 and x.shape == (3, 16, 16)
    torch.testing.assert_close(x, torch.full_like(x, 128 / 127.5 - 1))  # mid-gray, not white (1.0)
    (tmp_path / "a" / "broken.png").write_text("no")
    with pytest.raises(ValueError, match="broken.png: not an image file"):
        load_dataset(str(tmp_path), "val", 16)[0]
