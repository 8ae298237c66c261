"""NVG and its VAR baseline share one API shape: configs from presets, `Model(config)`, a sampler built from
(generator, tokenizer) with `generate` / `sample`, one top-p convention (1.0 = off), tokenizers with
`encode` / `decode` and `config.vocab_size`. Tiny random models."""

import dataclasses

import pytest
import torch

import nvg  # noqa: F401
from nvg.baselines.var import sample as var_sample
from nvg.baselines.var.model import VAR, VARConfig
from nvg.baselines.var.sample import VARSampleConfig
from nvg.baselines.var.sampler import VARSampler
from nvg.baselines.var.vqvae import VQVAE, VQVAEConfig
from nvg.model import GeneratorConfig, NVGGenerator
from nvg.sample import sampler as nvg_sample
from nvg.sample import SampleConfig, Sampler
from nvg.tokenizer import Tokenizer, TokenizerConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU workloads: see tests/conftest.py


def nvg_pair():
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.from_name("test-ae-16px-4x4")).eval()
    tok.quantize.embedding.weight.data.normal_()
    gen = NVGGenerator(GeneratorConfig.from_name("nvg-test")).eval()
    return Sampler(gen, tok), SampleConfig(structure_steps=2)


def var_pair():
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig.from_name("var-vae-tiny")).eval()
    var = VAR(VARConfig.from_name("var-tiny")).eval()
    return VARSampler(var, vae), VARSampleConfig(top_k=50)


@pytest.fixture(scope="module", params=["nvg", "var"])
def pair(request):
    return nvg_pair() if request.param == "nvg" else var_pair()


def test_same_call_same_seed_same_images(pair):
    sampler, config = pair
    side = sampler.tokenizer.config.image_size
    labels = torch.tensor([1, 3])
    a = sampler.sample(labels, config, seed=0)
    assert a.shape == (2, 3, side, side) and a.dtype == torch.float32
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert torch.equal(a, sampler.sample(labels, config, seed=0))
    assert not torch.equal(a, sampler.sample(labels, config, seed=1))
    assert sampler.sample(labels, seed=0).shape == a.shape  # config=None: the defaults
    # generate gives the tokens that sample decodes
    tokens = sampler.generate(labels, config, seed=0)
    tokens = getattr(tokens, "tokens", tokens)  # NVG: a VGS; VAR: the token maps
    assert all(t.dtype == torch.long and t.shape[0] == 2 for t in tokens)
    # the generator and the tokenizer agree on the vocabulary, read the same way on both sides
    assert sampler.model.config.vocab_size == sampler.tokenizer.config.vocab_size
    assert all(int(t.max()) < sampler.tokenizer.config.vocab_size for t in tokens)


def test_config_fields_match():
    shared = {"content_cfg", "top_k", "top_p", "temperature"}
    assert shared <= set(SampleConfig.__dataclass_fields__)
    assert shared == set(VARSampleConfig.__dataclass_fields__)


@pytest.mark.parametrize("module", [nvg_sample, var_sample], ids=["nvg", "var"])
def test_top_p_one_is_off_and_zero_is_rejected(module):
    logits = torch.tensor([[[8.0, 0.0, -30.0, -60.0, 2.0]]])  # some tokens with (almost) zero probability
    assert torch.equal(module.filter_top_k_top_p(logits, top_k=0, top_p=1.0), logits)
    assert torch.equal(module.filter_top_k_top_p(logits), logits)  # defaults: off
    assert module.filter_top_k_top_p(logits, top_p=0.5).isfinite().sum() == 1
    for bad in (0.0, -1.0, 1.01):
        with pytest.raises(ValueError, match=r"top_p in \(0, 1\] \(1.0 = off\)"):
            module.filter_top_k_top_p(logits, top_p=bad)
    with pytest.raises(ValueError, match="top_k >= 0"):
        module.filter_top_k_top_p(logits, top_k=-1)


def test_sample_configs_reject_top_p_zero():
    with pytest.raises(ValueError, match=r"top_p in \(0, 1\]"):
        SampleConfig(top_p=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"top_p in \(0, 1\]"):
        VARSampleConfig(top_p=0.0)
    VARSampleConfig(top_p=1.0), SampleConfig(top_p=(1.0, 1.0))  # off


@pytest.mark.parametrize("side", ["nvg", "var"])
def test_tokenizers_encode_decode_round_trip_shapes(side):
    torch.manual_seed(0)
    if side == "nvg":
        tok = Tokenizer(TokenizerConfig.from_name("test-ae-16px-4x4")).eval()
    else:
        tok = VQVAE(VQVAEConfig.from_name("var-vae-tiny")).eval()
    s = tok.config.image_size
    x = torch.rand(2, 3, s, s) * 2 - 1
    codes = tok.encode(x)
    tokens = codes.tokens if side == "nvg" else codes
    assert all(t.dtype == torch.long and t.shape[0] == 2 for t in tokens)
    assert all(0 <= int(t.min()) and int(t.max()) < tok.config.vocab_size for t in tokens)
    y = tok.decode(codes)
    assert y.shape == x.shape and float(y.abs().max()) <= 1


def test_presets_from_name_with_overrides():
    assert VARConfig.from_name("var-tiny", depth=2).width == 128  # preset width kept
    assert VARConfig.from_name("var-d16", depth=20).width == 64 * 20  # 0 = the released rule, from the new depth
    assert VQVAEConfig.from_name("var-vae-tiny", vocab_size=64).vocab_size == 64
    assert TokenizerConfig.from_name("test-ae-16px-4x4").vocab_size == 64
    for cls, name in ((VARConfig, "VAR"), (VQVAEConfig, "VQVAE"), (GeneratorConfig, "generator"),
                      (TokenizerConfig, "tokenizer")):
        with pytest.raises(ValueError, match=f"unknown {name} preset"):
            cls.from_name("nope")
    assert not hasattr(VAR, "from_name") and not hasattr(VQVAE, "from_name")


def test_cfg_schedules_default_to_the_models_recorded_ones():
    """Unset CFG schedules come from the model (recorded by its training run), else the official ones; set ones stay.
    Sampling with the defaults equals sampling with the recorded schedule written out, and differs from official."""
    official = GeneratorConfig.from_name("nvg-test")
    assert (SampleConfig().resolved(official).content_cfg, SampleConfig().resolved(official).structure_cfg) == \
        (nvg_sample.OFFICIAL_CONTENT_CFG, nvg_sample.OFFICIAL_STRUCTURE_CFG) == ((1.0, 3.5), (1.0, 2.5))
    own = GeneratorConfig.from_name("nvg-test", sample_content_cfg=[1, 7], sample_structure_cfg=(1, 6))
    assert (own.sample_content_cfg, own.sample_structure_cfg) == ((1.0, 7.0), (1.0, 6.0))
    r = SampleConfig().resolved(own)
    assert (r.content_cfg, r.structure_cfg) == ((1.0, 7.0), (1.0, 6.0))
    r = SampleConfig(content_cfg=(2, 3)).resolved(own)
    assert (r.content_cfg, r.structure_cfg) == ((2.0, 3.0), (1.0, 6.0))
    # recorded structure steps likewise (None: the variant's default)
    assert SampleConfig().resolved(official).structure_steps == 25
    assert SampleConfig().resolved(dataclasses.replace(own, sample_structure_steps=2)).structure_steps == 2
    assert SampleConfig(structure_steps=3).resolved(dataclasses.replace(own, sample_structure_steps=2)) \
        .structure_steps == 3
    with pytest.raises(ValueError, match="sample_structure_steps must be None or an integer >= 1"):
        GeneratorConfig.from_name("nvg-test", sample_structure_steps=0)
    # a checkpoint config written before the fields existed (no keys) rebuilds with the official schedules
    old = {k: v for k, v in dataclasses.asdict(own).items() if not k.startswith("sample_")}
    assert GeneratorConfig(**old).sample_content_cfg is None
    sampler, _ = nvg_pair()
    sampler.model.config = own
    y = torch.arange(4) % own.num_classes
    base = SampleConfig(structure_steps=2)
    recorded = sampler.generate(y, base, seed=0)
    written = sampler.generate(y, dataclasses.replace(base, content_cfg=(1.0, 7.0), structure_cfg=(1.0, 6.0)), seed=0)
    plain = sampler.generate(y, dataclasses.replace(base, content_cfg=(1.0, 3.5), structure_cfg=(1.0, 2.5)), seed=0)
    assert torch.equal(recorded.f_hat, written.f_hat)
    assert not torch.equal(recorded.f_hat, plain.f_hat)


@pytest.mark.parametrize("bad", [(1.0,), (1.0, 2.0, 3.0), "ab", (1.0, float("nan")), (1.0, float("inf"))])
def test_cfg_schedules_refuse_what_is_not_two_finite_numbers(bad):
    with pytest.raises(ValueError, match="content_cfg must be two finite numbers"):
        SampleConfig(content_cfg=bad)
    with pytest.raises(ValueError, match="sample_structure_cfg must be two finite numbers"):
        GeneratorConfig.from_name("nvg-test", sample_structure_cfg=bad)
