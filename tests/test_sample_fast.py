"""The fast NVG variant: prefix-cacheable structure transformer, cached sampling, few-step solvers."""
import dataclasses

import pytest
import torch

from nvg.convert_generator import load_official_generator
from nvg.kernels.block_attn import block_attn_bwd_triton, block_attn_fwd_triton
from nvg.model import PRESETS, GeneratorConfig, NVGGenerator
from nvg.prefix import PrefixCache, forward_structure_prefix, prefix_block, prefix_block_ids
from nvg.sample import SampleConfig, Sampler
from nvg.sample.sampler import DEFAULT_STRUCTURE_SAMPLING
from nvg.structure import split_clusters
from nvg.tokenizer import Tokenizer


def tiny_pair(variant="nvg-tiny-fast", seed=0, **overrides):
    torch.manual_seed(seed)
    tok = Tokenizer("tiny-ae-32px-8x8").eval()
    cfg = GeneratorConfig.from_name(variant, latent_dim=tok.config.latent_channels, vocab_size=tok.config.vocab_size,
                                    **overrides)
    return NVGGenerator(cfg).eval(), tok


def structure_inputs(m, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = m.config
    N, K, C = cfg.num_positions, cfg.K, cfg.latent_dim
    canvas = torch.randn(B, N, C, generator=g)
    labels = torch.randint(0, 4, (B, N), generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (B,), generator=g)
    stage = torch.randint(0, cfg.num_stages - 2, (B,), generator=g)
    ids = m.content_rope(labels, 2)[0]
    sc = m.structure_context(canvas, y, stage, ids)
    return sc, torch.randn(B, N, K, generator=g), torch.rand(B, generator=g)


def test_presets_and_config():
    for name in ("nvg-tiny-fast", "nvg-d12-fast", "nvg-d16-fast", "nvg-d20-fast", "nvg-d24-fast"):
        fast = GeneratorConfig.from_name(name)
        assert fast.structure_attention == "prefix"
        assert dataclasses.replace(fast, structure_attention="full") == GeneratorConfig.from_name(name[:-5])
    assert GeneratorConfig().structure_attention == "full" and "nvg-test" in PRESETS
    with pytest.raises(ValueError, match="structure_attention must be one of"):
        GeneratorConfig(structure_attention="causal")
    # the checkpoint config (dataclasses.asdict, as the trainer writes it) records the variant and rebuilds it
    m, _ = tiny_pair()
    assert GeneratorConfig(**dataclasses.asdict(m.config)).structure_attention == "prefix"


def test_official_weights_refused_by_the_prefix_variant():
    m, _ = tiny_pair("nvg-tiny")
    with pytest.raises(ValueError, match="official generator weights .* structure_attention='prefix'"):
        load_official_generator(m.state_dict(), cfg=dataclasses.replace(m.config, structure_attention="prefix"))
    assert load_official_generator(m.state_dict(), cfg=m.config).config.structure_attention == "full"


@pytest.mark.parametrize("B", [1, 3])
def test_prefix_tokens_ignore_structure_tokens_and_time(B):
    m, _ = tiny_pair()
    sc, z, t = structure_inputs(m, B)
    block = m.structure_blocks[0]
    P = sc.tokens_BLC.shape[1]
    ids = prefix_block_ids(P, P + z.shape[1], z.device)
    outs = []
    for zz, tt in ((z, t), (torch.randn_like(z), torch.rand_like(t))):
        vec_str = sc.class_vec_BC + m.structure_time_embed(torch.randn(B, 64) * tt[:, None])
        outs.append(prefix_block(block, sc.tokens_BLC, sc.class_vec_BC, m.structure_embed(zz), vec_str, sc.freqs,
                                 ids))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=0, rtol=0)  # the prefix: unchanged
    assert not torch.allclose(outs[0][1], outs[1][1])


@pytest.mark.parametrize("B", [1, 3])
def test_cache_velocity_equals_recomputation(B):
    m, _ = tiny_pair()
    sc, z, t = structure_inputs(m, B, seed=B)
    cache = PrefixCache(m, B)
    with torch.no_grad():
        cache.fill(sc)
        for step in range(3):  # the same prefix, new structure tokens and times at every step
            zz, tt = z + step, (t + 0.3 * step) % 1
            torch.testing.assert_close(cache.velocity(zz, tt), forward_structure_prefix(m, sc, zz, tt),
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.forward_structure(sc, z, t), forward_structure_prefix(m, sc, z, t),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("structure_depth", [1, 3])
def test_structure_depth_other_than_depth(structure_depth):
    """`structure_depth` sets the structure blocks apart from the content blocks (0 = depth, the official layout)."""
    assert len(NVGGenerator(GeneratorConfig.from_name("nvg-tiny", depth=3)).structure_blocks) == 3
    with pytest.raises(ValueError, match="structure_depth must be >= 0"):
        GeneratorConfig(structure_depth=-1)
    m, tok = tiny_pair(structure_depth=structure_depth)
    assert len(m.structure_blocks) == structure_depth and len(m.content_blocks) == 2
    assert GeneratorConfig(**dataclasses.asdict(m.config)) == m.config  # recorded in the checkpoint config
    sc, z, t = structure_inputs(m, 2)
    cache = PrefixCache(m, 2)
    assert len(cache.caches) == structure_depth
    with torch.no_grad():
        cache.fill(sc)
        torch.testing.assert_close(cache.velocity(z, t), forward_structure_prefix(m, sc, z, t), atol=1e-5, rtol=1e-5)
    y = torch.arange(2)
    a = Sampler(m, tok).generate(y, SampleConfig(structure_steps=2), seed=1)
    b = Sampler(m, tok, structure_cache=False).generate(y, SampleConfig(structure_steps=2), seed=1)
    assert torch.equal(a.labels, b.labels)
    # an older checkpoint config has no structure_depth: the official layout
    old = {k: v for k, v in dataclasses.asdict(GeneratorConfig.from_name("nvg-tiny")).items() if k != "structure_depth"}
    assert len(NVGGenerator(GeneratorConfig(**old)).structure_blocks) == 2


def test_prefix_cache_bad_use():
    m, _ = tiny_pair("nvg-tiny")
    with pytest.raises(ValueError, match="structure_attention='prefix'"):
        PrefixCache(m, 2)
    m, _ = tiny_pair()
    cache = PrefixCache(m, 2)
    sc, z, t = structure_inputs(m, 3)
    with pytest.raises(RuntimeError, match="before fill"):
        cache.velocity(z[:2], t[:2])
    with pytest.raises(ValueError, match="prefix tokens must be"):
        cache.fill(sc)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        PrefixCache(m, 2, graph=True)


@pytest.mark.parametrize("solver,steps", [("euler", 25), ("euler", 4), ("heun", 2), ("heun", 1)])
@pytest.mark.parametrize("B", [1, 3])
def test_cached_sampler_equals_recomputation(solver, steps, B):
    m, tok = tiny_pair()
    y = torch.arange(B) % 10
    config = SampleConfig(structure_steps=steps, structure_solver=solver)
    traces = [{}, {}]
    a = Sampler(m, tok).generate(y, config, seed=1, trace=traces[0])
    b = Sampler(m, tok, structure_cache=False).generate(y, config, seed=1, trace=traces[1])
    assert torch.equal(a.labels, b.labels)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    for key in ("v_first", "v_last"):
        for va, vb in zip(traces[0][key], traces[1][key]):
            torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)


def test_solver_config():
    full, prefix = GeneratorConfig.from_name("nvg-tiny"), GeneratorConfig.from_name("nvg-tiny-fast")
    sc = SampleConfig()
    assert (sc.structure_steps, sc.structure_solver) == (None, None)  # unset: the model's default
    assert (sc.resolved(full).structure_steps, sc.resolved(full).structure_solver) == (25, "euler")  # official
    assert (sc.resolved(prefix).structure_steps, sc.resolved(prefix).structure_solver) == \
        DEFAULT_STRUCTURE_SAMPLING["prefix"]
    set_ = SampleConfig(structure_steps=3, structure_solver="euler").resolved(prefix)
    assert (set_.structure_steps, set_.structure_solver) == (3, "euler")  # what is set stays
    with pytest.raises(ValueError, match="structure_solver must be one of"):
        SampleConfig(structure_solver="rk4")


def test_heun_is_closer_to_many_steps_than_euler():
    # on the faithful sampler too: z after one stage with 2 Heun steps vs 2 Euler steps, against 50 Euler steps
    m, tok = tiny_pair("nvg-tiny")
    y = torch.arange(4)
    finals = {}
    for name, config in {"ref": SampleConfig(structure_steps=50), "euler": SampleConfig(structure_steps=2),
                         "heun": SampleConfig(structure_steps=2, structure_solver="heun")}.items():
        trace = {}
        Sampler(m, tok).generate(y, config, seed=3, trace=trace)
        finals[name] = trace["z_final_ch"][1]  # the first modelled stage with CFG
    err = {k: (finals[k] - finals["ref"]).abs().mean().item() for k in ("euler", "heun")}
    assert err["heun"] < err["euler"], err


def test_prefix_variant_trains():
    m, tok = tiny_pair()
    m.train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        vgs = tok.encode(x)
    out = m(vgs.canvas, vgs.labels, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    out["struct_v"].square().mean().backward()
    for name, p in m.named_parameters():
        if name.startswith("structure_") and "structure_head" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


class _TritonAttention(torch.autograd.Function):
    """block_attention through the Triton launchers (the CUDA route: interpreter on CPU tensors, native on a GPU)."""

    @staticmethod
    def forward(ctx, q, k, v, q_block, k_block):
        scale = q.shape[-1] ** -0.5
        out, lse = block_attn_fwd_triton(q, k, v, q_block, k_block, scale)
        ctx.save_for_backward(q, k, v, out, lse, q_block, k_block)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, q_block, k_block = ctx.saved_tensors
        dq, dk, dv = block_attn_bwd_triton(grad_out, q, k, v, out, lse, q_block, k_block, ctx.scale)
        return dq, dk, dv, None, None


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_prefix_training_through_the_triton_kernels(monkeypatch):
    """The fast variant's training forward and backward with its attention on the Triton kernels (their route on a
    GPU) give the velocities and gradients of the CPU path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = GeneratorConfig.from_name("nvg-test", structure_attention="prefix", head_dim=32, width=64, depth=2)
    m = NVGGenerator(cfg).to(device).train()
    B, S, N, C = 2, cfg.num_stages, cfg.num_positions, cfg.latent_dim
    g = torch.Generator().manual_seed(1)
    labels = [torch.zeros(B, N, dtype=torch.long)]
    for i in range(cfg.K):
        labels.append(split_clusters(labels[-1], torch.randn(B, N, generator=g), i))
    labels = torch.stack(labels, 1).to(device)
    canvas = torch.randn(B, S, N, C, generator=g).to(device)
    y = torch.tensor([1, cfg.num_classes], device=device)
    eps = torch.randn(B, N, cfg.K, generator=g).to(device)
    t = torch.rand(B, S - 2, generator=g).to(device)
    results, calls = [], []

    def triton_attention(q, k, v, q_block, k_block, check=True):
        calls.append((q.shape[2], k.shape[2]))
        return _TritonAttention.apply(q, k, v, q_block, k_block)

    for route in ("default", "triton"):
        if route == "triton":
            monkeypatch.setattr("nvg.prefix.block_attention", triton_attention)
        m.zero_grad()
        v = m(canvas, labels, y, eps, t)["struct_v"]
        (v * torch.linspace(-1, 1, v.numel(), device=device).view_as(v)).sum().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if n.startswith("structure_")}
        results.append((v.detach(), grads))
    P = 1 + N  # per block: the prefix queries over the prefix, the structure queries over everything (none for the
    # last block's prefix)
    assert calls == [(P, P), (N, P + N)] * (cfg.depth - 1) + [(N, P + N)]
    tol = dict(atol=1e-2, rtol=1e-2) if device == "cuda" else dict(atol=1e-4, rtol=1e-4)  # TF32 on a GPU
    torch.testing.assert_close(results[1][0], results[0][0], **tol)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, **tol, msg=name)


@pytest.mark.cuda
def test_cuda_graph_step_equals_eager():
    m, tok = tiny_pair()
    m = m.cuda()
    tok = tok.cuda()
    y = torch.arange(5, device="cuda") % 10
    config = SampleConfig(structure_steps=4)
    traces = [{}, {}]
    a = Sampler(m, tok).generate(y, config, seed=0, trace=traces[0])
    s = Sampler(m, tok, fast=True)
    s.generate(y, config, seed=0)  # capture
    b = s.generate(y, config, seed=0, trace=traces[1])
    assert any(c._cuda_graph is not None for c in s._prefix._caches.values())
    for va, vb in zip(traces[0]["v_last"], traces[1]["v_last"]):
        torch.testing.assert_close(va, vb, atol=2e-2, rtol=2e-2)
    assert (a.labels == b.labels).float().mean() > 0.9


def test_trainer_and_cli_with_the_fast_preset(tmp_path):
    # `python -m nvg.train generator --preset nvg-tiny-fast`, then `python -m nvg.sample --structure-solver heun`
    from nvg import checkpoint
    from nvg.checkpoint import open_checkpoint
    from nvg.sample.__main__ import main as sample_main
    from nvg.tokenizer import TokenizerConfig
    from nvg.train import common as T
    from nvg.train.generator import TrainConfig, main

    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(image_size=16, latent_size=4, base_channels=8, channel_mult=(1, 1, 1),
                                    num_res_blocks=1, latent_channels=8, codebook_size=64, norm_groups=4))
    checkpoint.save(tmp_path / "tok", 1, tok.state_dict(), {"kind": "tokenizer", "run_id": "t", "train": {},
                                                            "model": tok.config.to_dict()}, {"step": 1},
                    ema=T.EMA(tok, 0.0).state_dict())
    res = main(TrainConfig(tokenizer=str(tmp_path / "tok"), preset="nvg-tiny-fast", depth=1,
                           out_dir=str(tmp_path / "run"), steps=2, batch_size=4, max_images=16, warmup_steps=1, samples_per_class=1, sample_steps=2,
                           image_every=1000, ckpt_every=2, log_every=1, max_minutes=None))
    assert open_checkpoint(res["checkpoint"]).config["model"]["structure_attention"] == "prefix"
    m = NVGGenerator.from_checkpoint(tmp_path / "run")
    assert m.config.structure_attention == "prefix"
    out = tmp_path / "s.npz"
    sample_main(["--ckpt", str(tmp_path / "run"), "--classes", "1", "--n", "2", "--out", str(out),
                 "--structure-steps", "2", "--structure-solver", "heun"])
    assert out.exists()
