"""VAR's multi-scale VQVAE against the released code's outputs (shared reference var_ref_small.pt) and its layout."""


import pytest
import torch

from nvg.baselines.var.convert import load_vqvae, vqvae_config_from_state_dict
from nvg.checkpoint import check_state_dict
from nvg.baselines.var.quant import phi_index_per_scale
from nvg.baselines.var.vqvae import VQVAE, VQVAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU workloads: see tests/conftest.py


def read_key_file(path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, rest = line.split(" ", 1)
            shape_text = rest.rsplit(" ", 1)[0].strip("() \n")
            shapes[key] = tuple(int(s) for s in shape_text.split(",") if s.strip())
    return shapes


@pytest.fixture(scope="module")
def reference(var_reference):
    return var_reference


@pytest.fixture(scope="module")
def vae(reference):
    return load_vqvae(reference["vae_state"])


def test_phi_sharing_matches_released_rule():
    assert phi_index_per_scale(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_released_checkpoint_layout(reference_dir):
    """Every key and shape of vae_ch160v4096z32.pth, nothing more (built on the meta device: no memory)."""
    expected = read_key_file(reference_dir / "var_vae_ch160v4096z32_keys.txt")
    with torch.device("meta"):
        model = VQVAE(VQVAEConfig.from_name("var-vae-ch160"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
    assert vqvae_config_from_state_dict(model.state_dict()) == model.config


def test_reference_tokens_reconstruction_and_var_input(reference, vae, assert_close_scaled):
    img = reference["img"]
    with torch.no_grad():
        idx = vae.encode(img)
        assert len(idx) == 10
        for ours, theirs in zip(idx, reference["idx"]):
            assert torch.equal(ours, theirs)
        assert_close_scaled(vae.decode(reference["idx"]), reference["rec"], 1e-4)
        assert_close_scaled(vae.quantize.indices_to_var_input(reference["idx"]), reference["var_input"], 1e-5)


def test_multiscale_round_trip(assert_close_scaled):
    """encode -> tokens -> f_hat equals the encoder's own cumulative f_hat; decode keeps the image shape."""
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig.from_name("var-vae-tiny")).eval()
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        idx, f_hat_list = vae.quantize.encode(vae.encode_latent(img))
        assert [t.shape[1] for t in idx] == [pn * pn for pn in vae.config.patch_nums]
        assert all(int(t.min()) >= 0 and int(t.max()) < vae.config.vocab_size for t in idx)
        assert_close_scaled(vae.quantize.indices_to_fhat(idx), f_hat_list[-1], 1e-5)
        # cumulative: f_hat after scale k adds phi_k(bicubic_up(E[r_k])) to f_hat after scale k-1
        q = vae.quantize
        for k in range(1, len(idx)):
            step = q._upsampled_residual(k, q.indices_to_embedding(idx[k]))
            assert_close_scaled(f_hat_list[k] - f_hat_list[k - 1], step, 1e-5)
        assert vae.decode(idx).shape == img.shape
        assert torch.equal(vae.decode(idx), vae.decode(f_hat_list[-1]))  # token maps or their latent
        assert all(torch.equal(a, b) for a, b in zip(vae.encode(img), idx))


def test_training_forward_and_gradients():
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig.from_name("var-vae-tiny"))
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, vq_loss, hits = vae(img)
    assert rec.shape == img.shape and vq_loss.ndim == 0 and hits.shape == (6, 1024)
    assert int(hits.sum()) == 2 * sum(pn * pn for pn in vae.config.patch_nums)
    (rec.square().mean() + vq_loss).backward()
    for name in ("encoder.conv_in.weight", "quantize.embedding.weight", "quantize.quant_resi.qresi_ls.0.weight",
                 "decoder.conv_out.weight"):
        assert vae.get_parameter(name).grad is not None, name


def test_bad_inputs_raise_clear_errors(reference):
    vae = VQVAE(VQVAEConfig.from_name("var-vae-tiny"))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        vae.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="token map 1"):
        vae.quantize.indices_to_fhat([torch.zeros(1, pn * pn + (k == 1), dtype=torch.long)
                                      for k, pn in enumerate(vae.config.patch_nums)])
    state = dict(reference["vae_state"])
    state["decoder.up.1.block.2.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(ValueError, match=r"decoder\.up\.1\.block\.2\.conv1\.weight.*\(3, 3, 3, 3\)"):
        load_vqvae(state)
    state = dict(reference["vae_state"])
    del state["quant_conv.bias"]
    with pytest.raises(ValueError, match="missing key 'quant_conv.bias'"):
        check_state_dict(vae.__class__(vqvae_config_from_state_dict(reference["vae_state"])), state, "VQVAE")
