"""`python -m nvg.sample`: options from dataclasses, every bad input refused before any work (one line, exit 2),
outputs written atomically, reference images of any bit depth read correctly."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import nvg  # noqa: F401
from nvg.sample import SampleConfig
from nvg.sample import __main__ as sample_cli

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--structure-steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tiny_generator_run):
    return tiny_generator_run


def _cli(*args, cwd=None):
    env = {**os.environ, "NVG_TRACEBACK": ""}
    return subprocess.run([sys.executable, "-m", "nvg.sample", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def _one_line_exit_2(r):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m nvg.sample: error: "), r.stderr
    return lines[0]


def test_options_come_from_sample_config():
    cmd, ctl, sc = sample_cli.parse(["--ckpt", "x", "--content-cfg", "1", "3", "--gumbel", "--top-k", "1"])
    assert sc == SampleConfig(content_cfg=(1.0, 3.0), gumbel_split=True, top_k=1)
    assert sample_cli.parse(["--ckpt", "x"])[2] == SampleConfig()  # the defaults are SampleConfig's own
    assert cmd.n == 4 and cmd.ema and cmd.bf16 and ctl.structure_from is None
    cmd, _, _ = sample_cli.parse(["--ckpt", "x", "--no-ema", "--no-bf16", "--classes", "0", "Trouser"])
    assert not cmd.ema and not cmd.bf16 and cmd.classes == ("0", "Trouser")


def test_subprocess_errors_are_one_line(run, tmp_path):
    assert "must be an integer >= 1" in _one_line_exit_2(_cli("--ckpt", run, "--n", "0"))
    assert "no such generator checkpoint" in _one_line_exit_2(_cli("--ckpt", str(tmp_path / "nope")))
    assert "invalid float value" in _one_line_exit_2(_cli("--ckpt", run, "--content-cfg", "1", "x"))
    # --out a directory: refused before the model is loaded or anything is sampled
    line = _one_line_exit_2(_cli("--ckpt", run, "--out", str(tmp_path), *FAST))
    assert "must end with .png" in line
    (tmp_path / "d.png").mkdir()
    assert "is a directory" in _one_line_exit_2(_cli("--ckpt", run, "--out", str(tmp_path / "d.png"), *FAST))


@pytest.mark.parametrize("args, match", [
    (["--batch-size", "0"], "batch-size must be an integer >= 1"),
    (["--n", "-2"], "--n must be an integer >= 1"),
    (["--seed", "-1"], "--seed must be"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--top-p", "1", "1.5"], "top_p in"),
    (["--structure-steps", "0"], "structure_steps must be >= 1"),
    (["--content-cfg", "1"], "expected 2 arguments"),
    (["--out", "x.jpg"], "must end with .png"),
    (["--stages", "s.npz"], "--stages 's.npz' must end with .png"),
    (["--out", "a.png", "--stages", "a.png"], "same file"),
    (["--device", "tpu"], "unknown device"),
    (["--classes", "0", "Boot"], "unknown class 'Boot'"),
    (["--classes", "12"], "out of range"),
    (["--structure-from", "missing.png"], "no such image file"),
    (["--structure-map", "m.txt"], "must be a .npy"),
    (["--structure-map", "missing.npy"], "no such structure map"),
    (["--structure-from", "a.png", "--regenerate-from", "b.png"], "use only one of"),
    (["--keep-structure-only"], "--regenerate-from only"),
    (["--regenerate-from", "ref.png", "--keep-stages", "9"], "--keep-stages must be in"),
    (["--structure-from", "ref.png", "--structure-stages", "0"], "--structure-stages must be an integer >= 1"),
    (["--structure-from", "notimage.png"], "not an image file"),
    (["--out", "afile/x.png"], "cannot create the folder"),
])
def test_bad_inputs_refused_before_loading(run, tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save("ref.png")
    (tmp_path / "notimage.png").write_text("hello")
    (tmp_path / "afile").write_text("a file, not a folder")

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(sample_cli, "load_generator", no_loading)
    with pytest.raises((ValueError, FileNotFoundError, PermissionError, IsADirectoryError)) as e:
        sample_cli.main(["--ckpt", run, *FAST, *args])
    assert match in str(e.value), str(e.value)
    assert not (tmp_path / "samples.png").exists()


def test_npz_written_atomically(run, tmp_path, monkeypatch):
    out = tmp_path / "s.npz"
    res = sample_cli.main(["--ckpt", run, "--classes", "1", "Pullover", "--n", "2", "--out", str(out), *FAST])
    d = np.load(out)
    assert d["images"].shape == (4, 16, 16, 3) and d["images"].dtype == np.uint8
    assert d["labels"].tolist() == [1, 1, 2, 2] and res["images"] == str(out)
    before = out.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        sample_cli.main(["--ckpt", run, "--classes", "0", "--n", "1", "--out", str(out), *FAST])
    assert out.read_bytes() == before  # the old file is intact
    with pytest.raises(OSError, match="disk full"):
        sample_cli.main(["--ckpt", run, "--classes", "0", "--n", "1", "--out", str(tmp_path / "new.npz"), *FAST])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no partial file, no temporary left


def test_png_grid_and_stages(run, tmp_path):
    out, st = tmp_path / "g" / "grid.png", tmp_path / "st.png"
    sample_cli.main(["--ckpt", run, "--classes", "0", "--n", "2", "--out", str(out), "--stages", str(st), *FAST])
    assert Image.open(out).size[0] > 0 and Image.open(st).size[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "st.png"]


def _png16(path, value):
    Image.fromarray(np.full((16, 16), value, np.uint16)).save(path)  # mode "I;16": a 16-bit gray PNG


def test_16bit_reference_images(run, tmp_path):
    _png16(tmp_path / "mid.png", 32896)  # mid-gray: 32896 / 257 = 128
    x = sample_cli.read_images([str(tmp_path / "mid.png")], 16)
    assert x.shape == (1, 3, 16, 16) and abs(float(x.mean()) - (128 / 127.5 - 1)) < 0.01
    # a 16-bit mask: the bright half becomes cluster 1 (a saturated read would make the whole mask one value)
    mask = np.zeros((16, 16), np.uint16)
    mask[:, 8:] = 40000
    mask[:, :8] = 20000
    Image.fromarray(mask).save(tmp_path / "mask.png")
    maps = sample_cli.read_structure(str(tmp_path / "mask.png"), (4, 4))
    assert maps[0, 1].view(4, 4)[:, 2:].eq(1).all() and maps[0, 1].view(4, 4)[:, :2].eq(0).all()
    out = tmp_path / "t.npz"
    sample_cli.main(["--ckpt", run, "--classes", "2", "--n", "2", "--out", str(out), "--structure-from",
                     str(tmp_path / "mid.png"), "--structure-stages", "2", *FAST])
    assert np.load(out)["images"].shape == (2, 16, 16, 3)
