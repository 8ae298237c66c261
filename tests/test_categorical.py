"""Token draws by inverse CDF (nvg.categorical) in both samplers, against their multinomial references."""
import pytest
import torch

from nvg.baselines.var import sample as var_sample
from nvg.categorical import draw_from_cdf
from nvg.sample import sampler as nvg_sample

# (module, how its sample_tokens takes (logits, top_k, top_p, temperature, generator))
SAMPLERS = {
    "nvg": (nvg_sample, lambda f, x, k, p, t, g: f(x, t, k, p, g)),
    "var": (var_sample, lambda f, x, k, p, t, g: f(x, k, p, t, g)),
}


def filtered_probs(module, logits, top_k, top_p, temperature):
    """The reference distribution: softmax of the module's own filter (what its sample_tokens_ref draws from)."""
    return torch.softmax(module.filter_top_k_top_p(logits.float() / temperature, top_k, top_p), -1)


def draw(name, fn, logits, k, p, t, seed):
    module, call = SAMPLERS[name]
    return call(getattr(module, fn), logits, k, p, t, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (0, 0.7, 1.0), (3, 1.0, 1.0), (3, 0.8, 0.7),
                                                      (50, 0.5, 1.3), (1000, 0.95, 1.0)])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 7), (4, 5, 64)])
def test_draws_stay_in_the_reference_support(name, top_k, top_p, temperature, shape):
    g = torch.Generator().manual_seed(sum(shape) + top_k)
    logits = torch.randn(shape, generator=g) * 3
    if shape[-1] > 2:
        logits[..., :2] = logits[..., 2:3]  # ties, also at the k-th value
    probs = filtered_probs(SAMPLERS[name][0], logits, top_k, top_p, temperature)
    for seed in range(20):
        tok = draw(name, "sample_tokens", logits, top_k, top_p, temperature, seed)
        assert tok.shape == shape[:2] and tok.dtype == torch.long
        assert (probs.gather(-1, tok[..., None]) > 0).all()


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.8), (4, 1.0), (6, 0.9)])
def test_frequencies_match_the_reference_distribution(name, top_k, top_p):
    """20000 rows of one 9-way distribution: every frequency within 5 standard errors of the filtered softmax, the
    reference's frequencies alike (a check of the test itself)."""
    V, R = 9, 20000
    logits = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])[torch.randperm(V)]
    probs = filtered_probs(SAMPLERS[name][0], logits[None, None], top_k, top_p, 1.0)[0, 0]
    rows = logits.expand(1, R, V)
    for fn in ("sample_tokens", "sample_tokens_ref"):
        counts = torch.bincount(draw(name, fn, rows, top_k, top_p, 1.0, 0).flatten(), minlength=V).double()
        err = 5 * (probs * (1 - probs) / R).sqrt().double() + 1e-12
        assert ((counts / R - probs.double()).abs() <= err).all(), (fn, counts / R, probs)


@pytest.mark.parametrize("name", SAMPLERS)
def test_argmax_seed_and_bad_input(name):
    logits = torch.randn(3, 4, 11)
    assert torch.equal(draw(name, "sample_tokens", logits, 1, 0.5, 1.0, 0), logits.argmax(-1))
    a = draw(name, "sample_tokens", logits, 0, 0.9, 1.0, 5)
    assert torch.equal(a, draw(name, "sample_tokens", logits, 0, 0.9, 1.0, 5))  # one seed, one draw
    bad = logits.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        draw(name, "sample_tokens", bad, 0, 0.9, 1.0, 0)
    with pytest.raises(ValueError, match="top_p in"):
        draw(name, "sample_tokens", logits, 0, 0.0, 1.0, 0)


def test_draw_from_cdf_runs():
    cum = torch.tensor([[0.1, 0.1, 0.5, 1.0], [0.25, 0.5, 0.75, 1.0]])  # row 0: index 1 has weight 0
    for seed in range(50):
        i = draw_from_cdf(cum, torch.tensor([1, 0]), torch.tensor([3, 1]), torch.Generator().manual_seed(seed))
        assert i.tolist() == [2, 0]  # the only positive weight in [1, 3) / the one-element run
    assert draw_from_cdf(cum[:0], 0, 4).shape == (0,)
