"""`python -m nvg.demo`: the JSON API (results equal the library's, bad uploads answered with a message, concurrent
requests isolated), the command line, and the page driven in a headless Chromium through Selenium (the tests at the
end; skipped with the reason when the browser is absent). NVG_DEMO_SCREENSHOT=docs/demo.png saves the page."""

import base64
import dataclasses
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import nvg  # noqa: F401
from nvg.demo import Engine, make_server
from nvg.sample import SampleConfig, Sampler, control, loading

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["T-shirt/top", "Trouser", "Pullover"] + [f"c{i}" for i in range(3, 10)]


@pytest.fixture(scope="module")
def run(tiny_generator_run):
    return tiny_generator_run


@pytest.fixture(scope="module")
def loaded(run):
    return loading.load_generator(run)


@pytest.fixture(scope="module")
def url(loaded):
    server = make_server(Engine(*loaded), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------------------------ helpers
def png_url(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # uint16 (H, W) -> a 16-bit gray PNG, (H, W, 4) -> RGBA
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def huge_png_url(w: int, h: int) -> str:
    """A PNG whose header claims w x h pixels (a decompression bomb's shape; its pixel data is never read)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def left_mask(size: int = 256, upto: int = 120) -> np.ndarray:
    m = np.zeros((size, size, 3), np.uint8)
    m[:, :upto] = 255
    return m


def post(url, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/api/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


def wait(url, job, timeout=120):
    t0, seen = time.time(), []
    while time.time() - t0 < timeout:
        st = get(url, f"/api/job/{job}")
        seen.append(st["done"])
        if st["state"] in ("done", "error"):
            return st, seen
        time.sleep(0.02)
    raise AssertionError(f"job {job} did not finish in {timeout} s")


def generate(url, body):
    status, answer = post(url, body)
    assert status == 202, answer
    st, _ = wait(url, answer["job"])
    assert st["state"] == "done", st
    return st


def decode_png(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def to_input(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float()[None] / 127.5 - 1


FAST = {"structure_steps": 2}


# ------------------------------------------------------------------------------------------------------ the API
def test_info_and_page(url, loaded):
    info = get(url, "/api/info")
    assert info["classes"] == NAMES and info["num_stages"] == 5 and info["latent_hw"] == [4, 4]
    official = SampleConfig().resolved(loaded[0].config)  # the official defaults for this model
    assert info["defaults"] == json.loads(json.dumps(dataclasses.asdict(official)))
    with urllib.request.urlopen(url + "/", timeout=10) as r:
        assert b"mask-canvas" in r.read()


def test_results_equal_the_library(url, loaded):
    model, tok, _ = loaded
    st = generate(url, {"class": 2, "seed": 7, "n": 3, "sampler": FAST})
    vgs = Sampler(model, tok).generate(torch.full((3,), 2), SampleConfig(structure_steps=2), seed=7)
    assert torch.equal(torch.tensor(st["labels"]), vgs.labels)
    img = ((tok.decode(vgs.f_hat).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(decode_png(u), img[b]) for b, u in enumerate(st["images"]))
    assert len(st["progression"]) == 3 and all(len(p) == 5 for p in st["progression"])
    assert st["done"] == st["total"] == 6
    st = generate(url, {"class": 2, "seed": 7, "n": 1, "sampler": {**FAST, "structure_solver": "heun"}})
    vgs = Sampler(model, tok).generate(torch.full((1,), 2), SampleConfig(structure_steps=2, structure_solver="heun"),
                                       seed=7)
    assert torch.equal(torch.tensor(st["labels"]), vgs.labels)


def test_mask_gives_the_balanced_split(url):
    mask = left_mask()
    st = generate(url, {"class": 1, "mode": "mask", "mask": png_url(mask), "n": 2, "sampler": FAST})
    labels = torch.tensor(st["labels"])
    want = control.mask_to_structure(torch.from_numpy(mask[..., 0].astype(np.float32)), (4, 4))[0, 1]
    assert torch.equal(labels[:, 1], want.expand(2, -1))
    assert want.view(4, 4)[:, :2].eq(1).all() and want.view(4, 4)[:, 2:].eq(0).all()  # the left half


def test_transfer_and_regenerate(url, loaded):
    _, tok, _ = loaded
    ref = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    st = generate(url, {"class": 0, "mode": "transfer", "image": png_url(ref), "stages": 3, "n": 2, "sampler": FAST})
    enc = tok.encode(to_input(ref))
    assert torch.equal(torch.tensor(st["labels"])[:, :3], enc.labels[:, :3].expand(2, -1, -1))
    st = generate(url, {"class": 4, "mode": "regenerate", "image": png_url(ref), "keep_stages": 2, "n": 1,
                        "sampler": FAST})
    assert torch.equal(torch.tensor(st["labels"])[:, :2], enc.labels[:, :2])


@pytest.mark.parametrize("what, body, status, match", [
    ("not an image", {"mode": "transfer", "image": "data:image/png;base64," + base64.b64encode(b"hello").decode()},
     400, "not an image file"),
    ("enormous", {"mode": "transfer", "image": png_url(np.zeros((4100, 64, 3), np.uint8))}, 400, "4096x4096"),
    ("bomb", {"mode": "transfer", "image": huge_png_url(100000, 100000)}, 400, "4096x4096"),
    ("wide", {"mode": "regenerate", "image": huge_png_url(5000, 10)}, 400, "4096x4096"),
    ("truncated", {"mode": "transfer", "image": png_url(np.zeros((64, 64, 3), np.uint8))[:-40]}, 400, "cannot read the image"),
    ("not base64", {"mode": "transfer", "image": "data:image/png;base64,@@@"}, 400, "not valid base64"),
    ("no upload", {"mode": "regenerate"}, 400, "upload an image first"),
    ("blank mask", {"mode": "mask", "mask": png_url(np.zeros((64, 64, 3), np.uint8))}, 400, "canvas is blank"),
    ("bad class", {"class": 10}, 400, "class must be"),
    ("bad n", {"n": 0}, 400, "number of samples"),
    ("bad top-p", {"sampler": {"top_p": [1.0, 0.0]}}, 400, "top_p"),
    ("bad solver", {"sampler": {"structure_solver": "rk4"}}, 400, "structure_solver"),
    ("solver not text", {"sampler": {"structure_solver": 2}}, 400, "structure_solver"),
    ("bad keep", {"mode": "regenerate", "image": png_url(np.zeros((8, 8, 3), np.uint8)), "keep_stages": 5}, 400,
     "stages to keep"),
])
def test_bad_requests_answered(url, what, body, status, match):
    got, answer = post(url, body)
    assert got == status and match in answer["error"], (what, answer)
    assert get(url, "/api/info")["num_stages"] == 5  # still serving


def test_bad_bodies_answered(url):
    assert post(url, None, raw=b"{not json")[1]["error"] == "the request is not valid JSON"
    big = b'{"image": "' + b"A" * (17 * 1024 * 1024) + b'"}'
    status, answer = post(url, None, raw=big)
    assert status == 413 and "too large" in answer["error"]
    assert get(url, "/api/info")["num_stages"] == 5


def test_16bit_and_rgba_uploads_noted(url):
    g16 = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    st = generate(url, {"mode": "transfer", "image": png_url(g16), "n": 1, "sampler": FAST})
    assert any("16-bit" in n for n in st["notes"]), st["notes"]
    rgba = np.full((20, 30, 4), 200, np.uint8)
    st = generate(url, {"mode": "transfer", "image": png_url(rgba), "n": 1, "sampler": FAST})
    assert any("alpha" in n for n in st["notes"]) and any("centre-cropped" in n for n in st["notes"]), st["notes"]


def test_concurrent_requests_do_not_mix(url):
    bodies = [{"class": c, "seed": s, "n": 2, "sampler": FAST} for c, s in ((1, 11), (5, 12), (1, 11), (8, 13))]
    alone = [generate(url, b)["labels"] for b in bodies[:2]]
    results = [None] * 4

    def go(i):
        results[i] = generate(url, bodies[i])["labels"]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results[0] == alone[0] == results[2] and results[1] == alone[1] and results[3] is not None


def test_progress_reported(url):
    status, answer = post(url, {"n": 4, "sampler": {"structure_steps": 25}})
    st, seen = wait(url, answer["job"])
    assert st["state"] == "done" and seen == sorted(seen) and st["done"] == st["total"]


# ------------------------------------------------------------------------------------------------------ the command
def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nvg.demo", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "NVG_TRACEBACK": ""}, timeout=60)


def test_command_without_checkpoint_says_how_to_train(tmp_path):
    r = _cli(cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "python -m nvg.train" in r.stderr and "runs/main/generator" in r.stderr
    r = _cli("--ckpt", str(tmp_path / "nope"))
    assert r.returncode == 2 and "--ckpt" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_command_serves_on_localhost(run):
    p = subprocess.Popen([sys.executable, "-m", "nvg.demo", "--ckpt", run, "--port", "0", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("NVG demo on http://127.0.0.1:"), (line, p.stderr.read() if p.poll() else "")
        address = line.split()[3].rstrip("/")
        assert get(address, "/api/info")["classes"] == NAMES
    finally:
        p.terminate()
        p.wait(10)


# ------------------------------------------------------------------------------------------------------ the browser
def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e \".[demo]\")"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        return "no chromium + chromedriver on PATH (apt-get install -y chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1180",
                "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _open(browser, url, mode):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element("tag name", "body").get_attribute("data-state") == "ready")
    browser.find_element("css selector", f"input[name=mode][value={mode}]").click()


def _generate(browser, expect="done"):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_script("document.body.dataset.state = 'clicked'")
    browser.find_element("id", "generate").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-state") in ("done", "error"))
    state = browser.find_element("tag name", "body").get_attribute("data-state")
    message = browser.find_element("id", "message").text
    assert state == expect, message
    return browser.execute_script("return window.nvgLast"), message


def _draw_left_half(browser):
    """Three vertical strokes with the 40 px brush across the left of the 256 px canvas (x 0..120)."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = browser.find_element("id", "mask-canvas")
    for x in (20, 60, 100):
        chain = ActionChains(browser, duration=10).move_to_element_with_offset(canvas, x - 128, -120).click_and_hold()
        for y in range(-80, 121, 40):
            chain = chain.move_to_element_with_offset(canvas, x - 128, y)
        chain.release().perform()
    return decode_png(browser.execute_script("return document.getElementById('mask-canvas').toDataURL()"))


def test_browser_mask(browser, url):
    _open(browser, url, "mask")
    browser.find_element("css selector", "#class option[value='1']").click()
    n = browser.find_element("id", "n")
    n.clear()
    n.send_keys("4")
    drawn = _draw_left_half(browser)
    assert drawn[:, :120].mean() > 200 and drawn[:, 140:].max() == 0  # the strokes landed where drawn
    result, _ = _generate(browser)
    labels = torch.tensor(result["labels"])
    want = control.mask_to_structure(torch.from_numpy(drawn[..., 0].astype(np.float32)), (4, 4))[0, 1]
    assert labels.shape == (4, 5, 16) and torch.equal(labels[:, 1], want.expand(4, -1))
    assert want.view(4, 4)[:, :2].eq(1).all()  # the drawn (left) half is cluster 1
    assert len(browser.find_elements("css selector", "#samples .sample")) == 4
    assert len(browser.find_elements("css selector", "#progression .stage")) == 5
    assert browser.find_element("id", "progress-text").text.startswith("done in")
    browser.find_elements("css selector", "#samples .sample")[2].click()  # its progression
    assert browser.find_element("id", "prog-title").text == "(sample 3)"
    shot = os.environ.get("NVG_DEMO_SCREENSHOT")
    if shot:
        browser.find_element("css selector", "#samples .sample").click()
        browser.execute_script("document.getElementById('sampler').open = true")
        browser.save_screenshot(shot)


def test_browser_transfer(browser, url, loaded, tmp_path):
    _, tok, _ = loaded
    ref = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(ref).save(tmp_path / "ref.png")
    _open(browser, url, "transfer")
    browser.find_element("id", "ref-file").send_keys(str(tmp_path / "ref.png"))
    stages = browser.find_element("id", "stages")
    stages.clear()
    stages.send_keys("2")
    result, _ = _generate(browser)
    labels = torch.tensor(result["labels"])
    assert torch.equal(labels[:, :2], tok.encode(to_input(ref)).labels[:, :2].expand(len(labels), -1, -1))


def test_browser_bad_upload(browser, url, tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all")
    _open(browser, url, "transfer")
    browser.find_element("id", "ref-file").send_keys(str(tmp_path / "notes.png"))
    _, message = _generate(browser, expect="error")
    assert "not an image file" in message
    Image.fromarray(np.full((40, 30, 4), 90, np.uint8)).save(tmp_path / "rgba.png")  # then a good (RGBA) one
    browser.find_element("id", "ref-file").send_keys(str(tmp_path / "rgba.png"))
    result, message = _generate(browser)
    assert message == "" and len(result["images"]) == 4
    assert "alpha" in browser.find_element("id", "notes").text
