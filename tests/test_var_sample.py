"""VAR sampling: static-KV-cache sampling equals full recomputation with the block-causal mask (argmax)."""


import pytest
import torch

from nvg.baselines.var.convert import load_var, load_vqvae
from nvg.baselines.var.graphs import GraphedSampler
from nvg.baselines.var.model import VAR
from nvg.baselines.var.sample import filter_top_k_top_p, make_caches, sample, sample_indices, sample_indices_recompute
from nvg.baselines.var.vqvae import VQVAE

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU workloads: see tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    vae, var = VQVAE.from_name("var-vae-tiny").eval(), VAR.from_name("var-tiny").eval()
    with torch.no_grad():  # move the near-identity init away from it so that every block matters
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae, var


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_cached_argmax_equals_recompute(tiny, cfg):
    vae, var = tiny
    labels = torch.tensor([0, 4, 10])  # 10 = null class
    cached, f_hat = sample_indices(var, vae.quantize, labels, cfg=cfg, top_k=1)
    full = sample_indices_recompute(var, vae.quantize, labels, cfg=cfg)
    for k, (a, b) in enumerate(zip(cached, full)):
        assert torch.equal(a, b), f"scale {k}"
    torch.testing.assert_close(f_hat, vae.quantize.indices_to_fhat(cached), atol=1e-5, rtol=0)


def test_cached_argmax_equals_recompute_reference_weights(var_reference):
    """Same check at the released sequence length (680 tokens, 10 scales, V 4096) with the reference weights."""
    ref = var_reference
    vae, var = load_vqvae(ref["vae_state"]), load_var(ref["var_state"])
    labels = ref["labels"][:1]
    cached, _ = sample_indices(var, vae.quantize, labels, cfg=1.5, top_k=1)
    full = sample_indices_recompute(var, vae.quantize, labels, cfg=1.5)
    for k, (a, b) in enumerate(zip(cached, full)):
        assert torch.equal(a, b), f"scale {k}"


def test_seeded_sampling_is_deterministic_and_caches_reusable(tiny):
    vae, var = tiny
    labels = torch.tensor([1, 2])
    a = sample(var, vae, labels, cfg=1.5, top_k=50, top_p=0.9, seed=7)
    b = sample(var, vae, labels, cfg=1.5, top_k=50, top_p=0.9, seed=7)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    caches = make_caches(var, 4, "cpu", torch.float32)
    g = torch.Generator().manual_seed(3)
    first, _ = sample_indices(var, vae.quantize, labels, top_k=50, generator=g, caches=caches)
    g = torch.Generator().manual_seed(3)
    again, _ = sample_indices(var, vae.quantize, labels, top_k=50, generator=g, caches=caches)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_static_buffer_sampler_equals_sample_indices(tiny):
    """GraphedSampler's static-buffer path (eager here) gives the same tokens as sample_indices, call after call."""
    vae, var = tiny
    labels = torch.tensor([3, 10])
    graphed = GraphedSampler(var, vae.quantize, batch=2, use_graphs=False)
    for seed in (0, 1):
        expected, f_expected = sample_indices(var, vae.quantize, labels, cfg=1.5, top_k=20,
                                              generator=torch.Generator().manual_seed(seed))
        got, f_got = graphed(labels, cfg=1.5, top_k=20, generator=torch.Generator().manual_seed(seed))
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
        torch.testing.assert_close(f_got, f_expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="built for batch 2"):
        graphed(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        GraphedSampler(var, vae.quantize, batch=2, use_graphs=True)


@pytest.mark.cuda
def test_cuda_graphs_equal_eager_on_gpu(tiny):
    vae, var = (m.to("cuda") for m in tiny)
    try:
        labels = torch.tensor([3, 10], device="cuda")
        graphed = GraphedSampler(var, vae.quantize, batch=2)
        expected, _ = sample_indices(var, vae.quantize, labels, cfg=1.5, top_k=1)
        got, _ = graphed(labels, cfg=1.5, top_k=1)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
    finally:
        vae.to("cpu"), var.to("cpu")


def test_top_k_top_p_filter():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.0, -1.0]]])
    kept = filter_top_k_top_p(logits, top_k=2).isfinite()
    assert kept.tolist() == [[[False, True, False, True, False]]]
    # softmax of (3, 2, 1, 0, -1): 0.636, 0.234, ... -> top_p 0.6 keeps only the largest, 0.8 the two largest
    assert filter_top_k_top_p(logits, top_p=0.6).isfinite().sum() == 1
    assert filter_top_k_top_p(logits, top_p=0.8).isfinite().sum() == 2
    assert torch.equal(filter_top_k_top_p(logits), logits)


def test_bad_inputs_raise_clear_errors(tiny):
    vae, var = tiny
    with pytest.raises(ValueError, match=r"labels must be non-empty class ids in \[0, 10\]"):
        sample_indices(var, vae.quantize, torch.tensor([11]))
    with pytest.raises(ValueError, match="labels must be long"):
        sample_indices(var, vae.quantize, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="does not fit the tokenizer"):
        sample_indices(VAR.from_name("var-tiny", vocab_size=64), vae.quantize, torch.tensor([1]))
    with pytest.raises(ValueError, match="caches must be"):
        sample_indices(var, vae.quantize, torch.tensor([1]), caches=make_caches(var, 4, "cpu", torch.float32))
