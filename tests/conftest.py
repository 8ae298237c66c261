import os
from pathlib import Path

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module's tests run (restored after). Modules of small CPU workloads opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`: oversubscribed OpenMP threads make them several times
    slower on a busy machine. The op tests keep the default so that at::parallel_for runs in parallel."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` need a GPU; on a CPU machine they are deselected with a reason, not silently passed.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Official reference outputs (../shared/reference beside the repository, or NVG_REFERENCE_DIR): see its README.
REFERENCE_DIR = Path(os.environ.get("NVG_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))


def _load_reference(name):
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"official reference outputs not found at {path} (set NVG_REFERENCE_DIR)")
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="session")
def reference_dir():
    """The folder of official reference files; skips (with the reason) when it is absent."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"official reference folder not found at {REFERENCE_DIR} (set NVG_REFERENCE_DIR)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def nvg_reference():
    """The official NVG code's outputs (nvg_ref_small.pt): a dict with flat keys like 'clustering.labels'."""
    return _load_reference("nvg_ref_small.pt")


@pytest.fixture(scope="session")
def var_reference():
    """The released VAR code's outputs (var_ref_small.pt)."""
    return _load_reference("var_ref_small.pt")


@pytest.fixture(scope="session")
def assert_close_scaled():
    """assert_close against a reference with an absolute tolerance scaled by the reference's magnitude:
    atol = tol * max(1, max |expected|), rtol = 0. Float rounding differs between CPUs (FMA, vector widths, BLAS
    blocking) in proportion to the values computed, so a fixed atol tuned on one CPU fails on another."""

    def check(actual, expected, tol, **kw):
        scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
        torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=0, **kw)

    return check
