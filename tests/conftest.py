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


@pytest.fixture(scope="session")
def tiny_generator_run(tmp_path_factory):
    """A tiny random generator + tokenizer saved as trained runs (16x16 images, 4x4 latents, 5 stages; the class
    names of Fashion-MNIST's first three classes, then c3..c9). Returns the generator's run directory."""
    import dataclasses

    from nvg import checkpoint
    from nvg.model import GeneratorConfig, NVGGenerator
    from nvg.sample import loading
    from nvg.tokenizer import Tokenizer, TokenizerConfig

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    gcfg = GeneratorConfig.from_name("nvg-test")
    tok = Tokenizer(TokenizerConfig(image_size=16, latent_size=4, base_channels=8, channel_mult=(1, 1, 1),
                                    num_res_blocks=1, latent_channels=gcfg.latent_dim, codebook_size=gcfg.vocab_size,
                                    norm_groups=4))
    tok.quantize.embedding.weight.data.normal_()
    checkpoint.save(root / "tok", 1, tok.state_dict(), {"kind": "tokenizer", "run_id": "t",
                                                        "model": tok.config.to_dict()}, {})
    _, ref = loading.load_tokenizer(root / "tok")
    names = ["T-shirt/top", "Trouser", "Pullover"] + [f"c{i}" for i in range(3, 10)]
    checkpoint.save(root / "gen", 1, NVGGenerator(gcfg).state_dict(),
                    {"kind": "generator", "run_id": "g", "model": dataclasses.asdict(gcfg), "class_names": names,
                     "tokenizer": loading.tokenizer_reference(ref, root / "gen")}, {})
    return str(root / "gen")
