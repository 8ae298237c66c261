"""VAR sampling: static-KV-cache sampling equals full recomputation with the block-causal mask (argmax)."""


import pytest
import torch

from nvg.baselines.var.convert import load_var, load_vqvae
from nvg.baselines.var.graphs import GraphedSampler
from nvg.baselines.var.model import VAR, VARConfig
from nvg.baselines.var.sample import VARSampleConfig, filter_top_k_top_p, guidance_schedule, sample_indices_recompute
from nvg.baselines.var.sampler import VARSampler
from nvg.baselines.var.vqvae import VQVAE, VQVAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU workloads: see tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    vae, var = VQVAE(VQVAEConfig.from_name("var-vae-tiny")).eval(), VAR(VARConfig.from_name("var-tiny")).eval()
    with torch.no_grad():  # move the near-identity init away from it so that every block matters
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae, var


def argmax(content_cfg=(1.0, 2.5)) -> VARSampleConfig:
    return VARSampleConfig(content_cfg=content_cfg, top_k=1, top_p=1.0)


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_cached_argmax_equals_recompute(tiny, cfg):
    vae, var = tiny
    labels = torch.tensor([0, 4, 10])  # 10 = null class
    cached, f_hat = VARSampler(var, vae).generate_with_latent(labels, argmax((1.0, 1.0 + cfg)))
    full = sample_indices_recompute(var, vae.quantize, labels, (1.0, 1.0 + cfg))
    for k, (a, b) in enumerate(zip(cached, full)):
        assert torch.equal(a, b), f"scale {k}"
    torch.testing.assert_close(f_hat, vae.quantize.indices_to_fhat(cached), atol=1e-5, rtol=0)


def test_cached_argmax_equals_recompute_reference_weights(var_reference):
    """Same check at the released sequence length (680 tokens, 10 scales, V 4096) with the reference weights."""
    ref = var_reference
    vae, var = load_vqvae(ref["vae_state"]), load_var(ref["var_state"])
    labels = ref["labels"][:1]
    cached = VARSampler(var, vae).generate(labels, argmax())
    full = sample_indices_recompute(var, vae.quantize, labels)
    for k, (a, b) in enumerate(zip(cached, full)):
        assert torch.equal(a, b), f"scale {k}"


def test_guidance_schedule_is_the_released_ramp():
    """content_cfg = (1, 1 + cfg) gives the released t_k = cfg * k / (K - 1) bit for bit."""
    for cfg in (0.0, 1.5, 4.0):
        assert guidance_schedule((1.0, 1.0 + cfg), 10) == [cfg * k / 9 for k in range(10)]
    assert VARSampleConfig() == VARSampleConfig(content_cfg=(1.0, 2.5), top_k=900, top_p=0.96)  # released FID


def test_seeded_sampling_is_deterministic_and_caches_reusable(tiny):
    vae, var = tiny
    labels = torch.tensor([1, 2])
    sampler = VARSampler(var, vae)
    sc = VARSampleConfig(top_k=50, top_p=0.9)
    a = sampler.sample(labels, sc, seed=7)
    b = VARSampler(var, vae).sample(labels, sc, seed=7)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    first = sampler.generate(labels, sc, generator=torch.Generator().manual_seed(3))
    again = sampler.generate(labels, sc, generator=torch.Generator().manual_seed(3))  # the caches are reused
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, sampler.generate(labels, sc, seed=4)))


def test_static_buffer_sampler_equals_plain_sampler(tiny):
    """The static-buffer path of graphs.py (eager here) gives the same tokens as the plain path, call after call."""
    vae, var = tiny
    labels = torch.tensor([3, 10])
    plain, graphed = VARSampler(var, vae), VARSampler(var, vae, graphs=True)
    sc = VARSampleConfig(top_k=20, top_p=1.0)
    for seed in (0, 1):
        expected, f_expected = plain.generate_with_latent(labels, sc, seed=seed)
        got, f_got = graphed.generate_with_latent(labels, sc, seed=seed)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
        torch.testing.assert_close(f_got, f_expected, atol=0, rtol=0)
    assert torch.equal(graphed.sample(labels, sc, seed=2), plain.sample(labels, sc, seed=2))
    assert graphed.generate(torch.tensor([1, 2, 3]), sc, seed=0)[0].shape == (3, 1)  # one engine per batch size
    engine = graphed._graphed[2]
    with pytest.raises(ValueError, match="built for batch 2"):
        engine(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        GraphedSampler(var, vae.quantize, batch=2, use_graphs=True)


@pytest.mark.cuda
def test_cuda_graphs_equal_eager_on_gpu(tiny):
    vae, var = (m.to("cuda") for m in tiny)
    try:
        labels = torch.tensor([3, 10], device="cuda")
        expected = VARSampler(var, vae).generate(labels, argmax())
        got = VARSampler(var, vae, graphs=True).generate(labels, argmax())
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
    assert torch.equal(filter_top_k_top_p(logits), logits)  # top_k 0 and top_p 1.0: off
    assert torch.equal(filter_top_k_top_p(logits, top_p=1.0), logits)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"top_p in \(0, 1\] \(1.0 = off\)"):
            filter_top_k_top_p(logits, top_p=bad)
        with pytest.raises(ValueError, match=r"top_p in \(0, 1\]"):
            VARSampleConfig(top_p=bad)


def test_bad_inputs_raise_clear_errors(tiny):
    vae, var = tiny
    sampler = VARSampler(var, vae)
    with pytest.raises(ValueError, match=r"labels must be non-empty class ids in \[0, 10\]"):
        sampler.generate(torch.tensor([11]))
    with pytest.raises(ValueError, match="labels must be long"):
        sampler.generate(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="does not fit the tokenizer"):
        VARSampler(VAR(VARConfig.from_name("var-tiny", vocab_size=64)), vae)
    with pytest.raises(ValueError, match="temperature"):
        VARSampleConfig(temperature=0)
    with pytest.raises(ValueError, match="unknown VAR preset"):
        VARConfig.from_name("var-d99")
