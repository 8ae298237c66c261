"""Sampler: official chaining (depth-2 reference, argmax), schedules, filtering, CFG identity, seeds."""


import pytest
import torch

import nvg  # noqa: F401
from nvg.model import GeneratorConfig, NVGGenerator
from nvg.tokenizer import Tokenizer, TokenizerConfig
from nvg.sample.sampler import SampleConfig, Sampler, filter_top_k_top_p, linear_schedule, negative_log_sequence, time_schedule
from nvg.structure import check_nested

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ref(nvg_reference):
    return nvg_reference


def tokenizer_for(cfg: GeneratorConfig) -> Tokenizer:
    """A small tokenizer whose quantizer fits `cfg` (the generator only needs the quantizer; `sample` decodes)."""
    side = cfg.latent_hw[0]
    return Tokenizer(TokenizerConfig(image_size=4 * side, latent_size=side, base_channels=8, channel_mult=(1, 1, 1),
                                     num_res_blocks=1, latent_channels=cfg.latent_dim, codebook_size=cfg.vocab_size,
                                     norm_groups=4)).eval()


@pytest.fixture(scope="module")
def official_sampler(ref):
    model = NVGGenerator(GeneratorConfig(depth=2)).eval()
    model.load_state_dict(ref["gen_d2.state_dict"])
    tok = tokenizer_for(model.config)
    tok.quantize.load_state_dict(ref["quant.state_dict"])
    return Sampler(model, tok)


def test_schedules_match_official(ref):
    torch.testing.assert_close(torch.tensor(time_schedule(25, 256)), ref["gen_d2.gen.schedule_25"])
    assert negative_log_sequence(1.0, 0.5, 9) == pytest.approx(
        [1.0, .9788, .9513, .9156, .8694, .8094, .7317, .6308, 0.5], abs=1e-4)
    assert linear_schedule(1, 3.5, 9) == pytest.approx([1 + 0.3125 * i for i in range(9)])
    for name, mask in ref["misc.topkp.removed_mask"].items():
        k, p = name[1:].split("_p")
        assert torch.equal(torch.isinf(filter_top_k_top_p(ref["misc.topkp.logits"], int(k), float(p))), mask), name


def _cluster_tokens(pred_BN, labels_BN, n):
    return torch.zeros(pred_BN.shape[0], n, dtype=torch.long).scatter_(1, labels_BN, pred_BN)


# The full no-CFG chain runs all 9 stages; the CFG chain (twice the work) is resumed at stage 5 from the official
# stages 0..4 (tokens and label maps), which also checks stage-wise regeneration against the official chain.
@pytest.mark.parametrize("run,start", [("nocfg", 0), ("cfg", 5)])
def test_generation_matches_official(ref, official_sampler, run, start):
    p = f"gen_d2.gen.{run}."
    sc = SampleConfig(top_k=1, content_cfg=(1.0, 3.5) if run == "cfg" else (1.0, 1.0),
                      structure_cfg=(1.0, 2.5) if run == "cfg" else (1.0, 1.0))
    labels, pred = ref[p + "structure_in"], ref[p + "pred"]
    control = {}
    if start:
        control = dict(structure=labels[:, :start + 1],
                       tokens=[_cluster_tokens(pred[:, i], labels[:, i], 2**i) for i in range(start)])
    trace = {}
    vgs = official_sampler.generate(ref["gen_d2.gen.txt"][:, 0], sc, eps_BNK=ref["gen_d2.gen.structure_epsilon"],
                                    trace=trace, **control)
    assert torch.equal(vgs.labels, labels)
    assert torch.equal(vgs.token_map(), pred)
    torch.testing.assert_close(torch.cat([vgs.canvas[:, 1:], vgs.f_hat[:, None]], 1), ref[p + "pred_inp"], **TOL)
    torch.testing.assert_close(torch.stack(trace["x0_hat"], 1), ref[p + "x0_hat"][:, start:], **TOL)
    logits = torch.cat(trace["logits"], 1)
    off = 2**start - 1
    if start == 0:
        torch.testing.assert_close(logits[:, :15], ref[p + "logits_stage0to3"], **TOL)
    torch.testing.assert_close(logits[..., :16], ref[p + "logits_first16"][:, off:], **TOL)
    torch.testing.assert_close(logits.logsumexp(-1), ref[p + "logits_logsumexp"][:, off:], **TOL)
    first = start  # label maps of stages <= start are given: the flow first runs at stage `start` (for start + 1)
    torch.testing.assert_close(torch.stack(trace["z_final_ch"], 1), ref[p + "z_final_ch"][:, first:], **TOL)
    for key in ("v_first", "v_last"):
        for k, v in enumerate(trace[key]):  # stage 0 at scale 1 skips the unconditional half (same result)
            torch.testing.assert_close(v, ref[p + key][: v.shape[0], first + k], **TOL)


def tiny_sampler(seed=0):
    torch.manual_seed(seed)
    cfg = GeneratorConfig.from_name("nvg-test")
    model = NVGGenerator(cfg).eval()
    tok = tokenizer_for(cfg)
    tok.quantize.embedding.weight.data.normal_()
    return Sampler(model, tok)


def test_shapes_and_nesting():
    s = tiny_sampler()
    vgs = s.generate(torch.tensor([0, 3, 9]), SampleConfig(structure_steps=4), seed=1)
    cfg = s.model.config
    assert [tuple(t.shape) for t in vgs.tokens] == [(3, 2**i) for i in range(cfg.num_stages)]
    assert vgs.labels.shape == (3, cfg.num_stages, cfg.num_positions)
    assert vgs.canvas.shape == (3, cfg.num_stages, cfg.num_positions, cfg.latent_dim)
    check_nested(vgs.labels)


def test_same_seed_same_samples():
    s = tiny_sampler()
    sc = SampleConfig(structure_steps=3, gumbel_split=True)
    a = s.generate(torch.tensor([1, 2]), sc, seed=7)
    b = s.generate(torch.tensor([1, 2]), sc, seed=7)
    c = s.generate(torch.tensor([1, 2]), sc, seed=8)
    assert torch.equal(a.tokens_cat(), b.tokens_cat()) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.f_hat, b.f_hat)
    assert not torch.equal(a.tokens_cat(), c.tokens_cat())


def test_cfg_scale_one_equals_conditional_pass():
    s = tiny_sampler()
    sc = dict(top_k=1, content_cfg=(1.0, 1.0), structure_cfg=(1.0, 1.0), structure_steps=3)
    t1, t2 = {}, {}
    a = s.generate(torch.tensor([4, 5]), SampleConfig(**sc), seed=3, trace=t1)
    b = s.generate(torch.tensor([4, 5]), SampleConfig(**sc, always_cfg=True), seed=3, trace=t2)
    assert t2["v_first"][0].shape[0] == 4  # the unconditional half really ran
    for la, lb in zip(t1["logits"], t2["logits"]):
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.tokens_cat(), b.tokens_cat()) and torch.equal(a.labels, b.labels)


def test_bad_inputs():
    s = tiny_sampler()
    with pytest.raises(ValueError, match="class ids"):
        s.generate(torch.tensor([10 + 1]), seed=0)
    with pytest.raises(ValueError, match="temperature"):
        SampleConfig(temperature=0)
    for bad in ((1.0, 0.0), (0.0, 0.5), (1.5, 1.0)):
        with pytest.raises(ValueError, match=r"top_p in \(0, 1\] \(1.0 = off\)"):
            SampleConfig(top_p=bad)
    with pytest.raises(ValueError, match=r"top_p in \(0, 1\]"):
        filter_top_k_top_p(torch.zeros(1, 4), top_p=0.0)
    with pytest.raises(ValueError, match="eps_BNK"):
        s.generate(torch.tensor([1]), seed=0, eps_BNK=torch.zeros(1, 3, 3))


# torch.compile of the two passes costs 20-140 s on a 2-core CPU: the one slow test that proves the fast path exact
@pytest.mark.slow
def test_fast_path_gives_the_same_tokens():
    s = tiny_sampler()
    fast = Sampler(s.model, s.tokenizer, fast=True)
    sc = SampleConfig(top_k=1, structure_steps=2)
    a = s.generate(torch.tensor([1, 2]), sc, seed=4)
    b = fast.generate(torch.tensor([1, 2]), sc, seed=4)
    assert torch.equal(a.tokens_cat(), b.tokens_cat()) and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.f_hat, b.f_hat, atol=1e-5, rtol=1e-5)
