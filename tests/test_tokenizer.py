"""Tokenizer (encoder + quantizer + decoder) and the official-checkpoint converter, against official outputs."""


import pytest
import torch

from nvg.convert import load_official_tokenizer
from nvg.tokenizer import PRESETS, Tokenizer, TokenizerConfig, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU workloads: see tests/conftest.py

SEED = 20250818




@pytest.fixture(scope="module")
def ref(nvg_reference):
    return nvg_reference


def small_official_state_dict(ref):
    """The reduced official AE as an official-style checkpoint (with the keys the converter must drop)."""
    sd = dict(ref["ae_small.state_dict"])
    sd.update({f"quantize.{k}": v for k, v in ref["quant.state_dict"].items()})
    sd.update({f"ema_model.{k}": v for k, v in list(sd.items()) if k != "total_visited_codes"})
    sd["loss.discriminator.head.weight"] = torch.zeros(3)
    return {"state_dict": sd}


SMALL = TokenizerConfig(base_channels=32, channel_mult=(1, 1, 1, 2, 1))


def test_small_official_autoencoder(ref, assert_close_scaled):
    tok = load_official_tokenizer(small_official_state_dict(ref), SMALL)
    x = ref["ae.x_uint8"][:1].float() / 127.5 - 1
    with torch.no_grad():
        f = tok.encode_latent(x)
        assert_close_scaled(f, ref["ae_small.enc"], 1e-5)
        assert_close_scaled(tok.decoder(f), ref["ae_small.dec_raw"], 1e-4)
        vgs = tok.encode(x)
        nvg_input = ref["ae_small.nvg_input"]
        assert_close_scaled(vgs.canvas, nvg_input[..., :32], 1e-5)
        assert torch.equal(vgs.token_map(), nvg_input[..., 32].long())
        assert torch.equal(vgs.labels, nvg_input[..., 33].long())
        assert_close_scaled(vgs.f_hat, ref["ae_small.f_hat"], 1e-5)
        assert_close_scaled(tok.decode(vgs), ref["ae_small.recon_via_tokens"], 1e-4)
        _, vq_loss, _ = tok(x, ibq=True)  # official VQAE.forward outside a Trainer takes the IBQ branch
        torch.testing.assert_close(vq_loss, ref["ae_small.forward_vq_loss"], atol=1e-5, rtol=1e-5)


def real_config_tokenizer():
    """The official configuration with the reference's random weights (seed, then 1-D params += N(0, 0.05^2))."""
    torch.manual_seed(SEED + 6)
    tok = Tokenizer("nvg-ae-f16").eval()
    g = torch.Generator().manual_seed(SEED + 7)
    with torch.no_grad():
        for p in tok.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return tok


def test_real_config_parameters(ref):
    tok = real_config_tokenizer()
    assert count_parameters(tok) == ref["ae_real.n_float_params"] == 110_332_355
    sd = tok.state_dict()
    checksums = ref["ae_real.param_checksums"]
    assert set(checksums) == set(sd)
    for k, (s, a) in checksums.items():
        got = torch.tensor([sd[k].double().sum(), sd[k].double().abs().sum()])
        torch.testing.assert_close(got, torch.tensor([s, a], dtype=torch.float64), rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.slow
def test_real_config_outputs(ref, assert_close_scaled):
    tok = real_config_tokenizer()
    x = ref["ae.x_uint8"].float() / 127.5 - 1
    with torch.no_grad():
        f = tok.encode_latent(x)
        assert_close_scaled(f, ref["ae_real.enc"], 1e-5)
        dec = tok.decoder(f)
    assert_close_scaled(dec[:, :, ::4, ::4], ref["ae_real.dec_raw_stride4"], 1e-4)


def test_converter_errors(ref):
    ckpt = small_official_state_dict(ref)
    sd = dict(ckpt["state_dict"])
    with pytest.raises(KeyError, match="lacks"):
        load_official_tokenizer({k: v for k, v in sd.items() if k != "decoder.conv_out.conv.bias"}, SMALL)
    with pytest.raises(KeyError, match="lacks .* keys, e.g. 'encoder.down.1.block.0.nin_shortcut"):
        load_official_tokenizer(sd)  # weights of another configuration
    sd["decoder.conv_out.conv.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"decoder.conv_out.conv.bias.*\(4,\).*\(3,\)"):
        load_official_tokenizer(sd, SMALL)
    with pytest.raises(TypeError):
        load_official_tokenizer([1, 2], SMALL)
    ema = load_official_tokenizer(ckpt, SMALL, ema=True)  # the EMA copy is selectable
    assert torch.equal(ema.encoder.conv_in.conv.weight, ckpt["state_dict"]["encoder.conv_in.conv.weight"])


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny")])
def test_tiny_presets(name):
    torch.manual_seed(0)
    tok = Tokenizer(name).eval()
    cfg = tok.config
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    vgs = tok.encode(x)
    N = cfg.latent_size**2
    assert tok.num_stages == cfg.num_stages == N.bit_length()
    assert vgs.labels.shape == (2, tok.num_stages, N) and vgs.f_hat.shape == (2, N, cfg.latent_channels)
    for i in range(1, tok.num_stages):
        assert torch.equal(vgs.labels[:, i] // 2, vgs.labels[:, i - 1])
    assert all(int(t.max()) < cfg.codebook_size for t in vgs.tokens)
    y = tok.decode(vgs)
    assert y.shape == x.shape and y.abs().max() <= 1
    torch.testing.assert_close(tok.decode(vgs.f_hat), y)
    stages = tok.decode_stages(vgs)  # image after stage 0, 1, ..., K
    assert len(stages) == tok.num_stages and all(s.shape == x.shape for s in stages)
    torch.testing.assert_close(stages[-1], y)
    torch.testing.assert_close(stages[2], tok.decode(vgs.canvas[:, 3]))


def test_encoder_gets_gradient_through_straight_through():
    torch.manual_seed(0)
    tok = Tokenizer("tiny-ae-32px-8x8")
    x = torch.rand(2, 3, 32, 32) * 0.2 - 0.1  # stay inside the clamp
    rec, vq_loss, _ = tok(x)
    (rec - x).abs().mean().backward()  # reconstruction loss only: reaches the encoder through the straight-through path
    assert tok.encoder.conv_in.conv.weight.grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad is None or tok.quantize.embedding.weight.grad.abs().sum() == 0


def test_bad_inputs():
    tok = Tokenizer("tiny-ae-32px-8x8")
    with pytest.raises(ValueError, match="32x32 images, got 28x28"):
        tok.encode(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="3 image channels, got 1"):
        tok.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(TypeError, match="uint8"):
        tok.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="latent"):
        tok.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match="power of two"):
        TokenizerConfig(image_size=48, latent_size=16)
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        Tokenizer("nope")
