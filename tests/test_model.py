"""Generator model: official outputs (depth-2 reference), parameter counts of the presets, shapes, gradients."""

import pytest
import torch

import nvg  # noqa: F401
from nvg.blocks import rope_axes, rope_matrices, timestep_embedding
from nvg.model import GeneratorConfig, NVGGenerator, generator_loss
from nvg.structure import rope_ids_content

TOL = dict(atol=1e-4, rtol=1e-4)  # spec: <= 1e-4 on fp32 CPU


@pytest.fixture(scope="module")
def ref(nvg_reference):
    return nvg_reference


@pytest.fixture(scope="module")
def official(ref):
    model = NVGGenerator(GeneratorConfig(depth=2)).eval()
    model.load_state_dict(ref["gen_d2.state_dict"], strict=True)
    r = {k: v for k, v in ref.items() if k.startswith("gen_d2.train")}
    with torch.no_grad():
        out = model(ref["quant.canvas"][:2], ref["quant.labels"][:2], r["gen_d2.train.txt"][:, 0],
                    eps_BNK=r["gen_d2.train.eps0"][:, 0], t_BS=r["gen_d2.train.t"])
    return model, out


def test_training_forward_matches_official(ref, official):
    _, out = official
    torch.testing.assert_close(out["z_t"], ref["gen_d2.train.z_t"], **TOL)
    torch.testing.assert_close(out["x0_hat"], ref["gen_d2.train.x0_hat"], **TOL)
    torch.testing.assert_close(out["struct_v"], ref["gen_d2.train.struct_v"], **TOL)
    torch.testing.assert_close(out["struct_pred"], ref["gen_d2.train.struct_logits"], **TOL)
    torch.testing.assert_close(out["struct_target"], ref["gen_d2.train.s_gt"], **TOL)
    logits = torch.cat(out["logits"], 1)
    torch.testing.assert_close(logits[:, :15], ref["gen_d2.train.logits_stage0to3"], **TOL)
    torch.testing.assert_close(logits[..., :16], ref["gen_d2.train.logits_first16"], **TOL)
    torch.testing.assert_close(logits.logsumexp(-1), ref["gen_d2.train.logits_logsumexp"], **TOL)
    assert torch.equal(logits.argmax(-1), ref["gen_d2.train.logits_argmax"])


def test_compressed_delta_and_loss_match_official(ref, official):
    model, out = official
    canvas, labels = ref["quant.canvas"][:2], ref["quant.labels"][:2]
    delta = torch.cat([model.cluster_mean(out["x0_hat"][:, i] - canvas[:, i], labels[:, i], 2**i) for i in range(9)], 1)
    torch.testing.assert_close(delta, ref["gen_d2.train.compressed_delta"], **TOL)
    tpc = ref["quant.tokens_per_cluster"][:2]
    tokens = [tpc[:, 2**i - 1:2 ** (i + 1) - 1] for i in range(9)]
    loss, terms = generator_loss(out, ref["quant.f_hat"][:2], tokens)
    torch.testing.assert_close(loss, ref["gen_d2.train.loss"], **TOL)
    official_terms = ref["gen_d2.train.loss_terms"]
    for i in range(9):
        assert terms[f"ce_{i}"] == pytest.approx(official_terms[f"train/compressed_loss_{2**i}"], rel=1e-4)
    for k in range(7):
        assert terms[f"struct_{k}"] == pytest.approx(official_terms[f"train/structure_loss_{2**(k + 1)}"], rel=1e-4)


def test_training_noise_draws_follow_official_order(ref, official):
    model, _ = official
    torch.manual_seed(ref["gen_d2.train.seed"])
    with torch.no_grad():
        out = model(ref["quant.canvas"][:2], ref["quant.labels"][:2], ref["gen_d2.train.txt"][:, 0])
    torch.testing.assert_close(out["t"], ref["gen_d2.train.t"])
    torch.testing.assert_close(out["eps_s"], ref["gen_d2.train.e_s"])


def test_rope_and_timestep_embedding_match_official(ref):
    ids = rope_ids_content(ref["quant.labels"][:1, 3], 3, 8, (16, 16))
    torch.testing.assert_close(rope_matrices(ids, rope_axes(64, 8)), ref["rope.pe_content_stage3"])
    # arguments up to 1000 rad: float32 sin/cos of the same argument differ by ~1 ulp of the argument across kernels
    torch.testing.assert_close(timestep_embedding(ref["misc.timestep_embedding.t"], 64),
                               ref["misc.timestep_embedding.out"], **TOL)
    model = NVGGenerator(GeneratorConfig(depth=1, width=128))
    torch.testing.assert_close(model.rope_ids, ref["rope.rope_ids_buffer"])
    torch.testing.assert_close(model.scale_factors, ref["misc.scale_factors"])


def test_rope_axes_generalise():
    assert rope_axes(64, 8) == [8] + [2] * 8 + [20, 20]
    assert rope_axes(64, 6) == [12] + [2] * 6 + [20, 20]
    assert sum(rope_axes(64, 4)) == 64
    assert rope_axes(32, 6) == [4] + [2] * 6 + [8, 8]
    with pytest.raises(ValueError, match="too small"):
        rope_axes(64, 30)


EXPECTED_COUNTS = {12: (108421408, 27469064), 16: (255183904, 64369672), 20: (496602912, 124972808),
                   24: (856271392, 215176712)}
PAPER = {16: (255e6, 64e6), 20: (497e6, 125e6), 24: (856e6, 215e6)}


@pytest.mark.parametrize("depth", [12, 16, 20, 24])
def test_preset_parameter_counts(depth):
    with torch.device("meta"):  # no memory, no init cost
        model = NVGGenerator(GeneratorConfig.from_name(f"nvg-d{depth}"))
    counts = model.param_counts()
    assert counts == EXPECTED_COUNTS[depth]
    if depth in PAPER:
        for got, paper in zip(counts, PAPER[depth]):
            assert abs(got - paper) / paper < 0.01


def _tiny_batch(cfg, B=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S, N, C = cfg.num_stages, cfg.num_positions, cfg.latent_dim
    from nvg.structure import split_clusters

    maps = [torch.zeros(B, N, dtype=torch.long)]
    for i in range(cfg.K):
        maps.append(split_clusters(maps[-1], torch.randn(B, N, generator=gen), i))
    labels = torch.stack(maps, 1)
    canvas = torch.randn(B, S, N, C, generator=gen).cumsum(1) * 0.3
    canvas[:, 0] = 0
    tokens = [torch.randint(0, cfg.vocab_size, (B, 2**i), generator=gen) for i in range(S)]
    y = torch.randint(0, cfg.num_classes, (B,), generator=gen)
    return canvas, labels, tokens, y, canvas[:, -1] + 0.1


def test_tiny_shapes_and_backward():
    cfg = GeneratorConfig.from_name("nvg-test")
    model = NVGGenerator(cfg)
    canvas, labels, tokens, y, f_hat = _tiny_batch(cfg)
    out = model(canvas, labels, y)
    B, S, N, C, K = 2, cfg.num_stages, cfg.num_positions, cfg.latent_dim, cfg.K
    assert out["x0_hat"].shape == (B, S, N, C)
    assert [tuple(lg.shape) for lg in out["logits"]] == [(B, 2**i, cfg.vocab_size) for i in range(S)]
    assert out["struct_v"].shape == (B, S - 2, N, K)
    loss, _ = generator_loss(out, f_hat, tokens)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_inputs_raise_clear_errors():
    cfg = GeneratorConfig.from_name("nvg-test")
    model = NVGGenerator(cfg)
    canvas, labels, tokens, y, _ = _tiny_batch(cfg)
    with pytest.raises(ValueError, match="class ids"):
        model(canvas, labels, torch.tensor([0, cfg.num_classes + 1]))
    with pytest.raises(ValueError, match="expected canvas"):
        model(canvas[:, :3], labels, y)
    with pytest.raises(ValueError, match="unknown generator preset"):
        GeneratorConfig.from_name("nvg-d99")


def test_repa_projector_and_loss():
    cfg = GeneratorConfig.from_name("nvg-test", repa_dim=16, repa_depth=1)
    model = NVGGenerator(cfg)
    canvas, labels, tokens, y, f_hat = _tiny_batch(cfg)
    out = model(canvas, labels, y)
    assert out["repa_projected"].shape == (2, cfg.num_stages, cfg.num_positions, 16)
    target = torch.randn(2, cfg.num_positions, 16)
    loss, terms = generator_loss(out, f_hat, tokens, repa_target=target)
    loss.backward()
    assert model.projector[0].weight.grad is not None and "repa_0" in terms
    assert model.param_counts() == NVGGenerator(GeneratorConfig.from_name("nvg-test")).param_counts()
