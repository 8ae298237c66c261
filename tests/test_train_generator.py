"""Generator training: a tiny model overfits one batch, the CLI trains end to end, resume is exact, DDP on gloo."""

import dataclasses
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import nvg  # noqa: F401
from nvg import checkpoint
from nvg.checkpoint import CheckpointError, open_checkpoint
from nvg.train import common as T
from nvg.model import GeneratorConfig, NVGGenerator, generator_loss
from nvg.tokenizer import Tokenizer, TokenizerConfig
from nvg.train.generator import TrainConfig, main

TOK = dict(image_size=16, latent_size=4, base_channels=8, channel_mult=(1, 1, 1), num_res_blocks=1,
           latent_channels=8, codebook_size=64, norm_groups=4)


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory):
    """A randomly initialised tiny tokenizer saved like a trained one (its tokens are what the generator learns)."""
    run = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(**TOK))
    tok.quantize.embedding.weight.data.normal_()
    cfg = {"kind": "tokenizer", "run_id": "test", "model": tok.config.to_dict(), "train": {}}
    checkpoint.save(run, 1, tok.state_dict(), cfg, {"step": 1}, ema=T.EMA(tok, 0.0).state_dict())
    return str(run)


def _cfg(tok, out, **kw):
    base = dict(tokenizer=tok, preset="nvg-test", out_dir=str(out), steps=4, batch_size=4, max_images=32, lr=1e-3,
                warmup_steps=1, ema_decay=0.9, samples_per_class=1, sample_steps=2, image_every=1000,
                ckpt_every=2, log_every=1, max_minutes=None)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = GeneratorConfig.from_name("nvg-test", vocab_size=16)
    model = NVGGenerator(cfg)
    B, S, N, C = 4, cfg.num_stages, cfg.num_positions, cfg.latent_dim
    from nvg.structure import split_clusters

    maps = [torch.zeros(B, N, dtype=torch.long)]
    for i in range(cfg.K):
        maps.append(split_clusters(maps[-1], torch.randn(B, N), i))
    labels = torch.stack(maps, 1)
    canvas = torch.randn(B, S, N, C).cumsum(1) * 0.2
    canvas[:, 0] = 0
    tokens = [torch.randint(0, cfg.vocab_size, (B, 2**i)) for i in range(S)]
    f_hat, y = torch.randn(B, N, C), torch.arange(B)
    eps, t = torch.randn(B, N, cfg.K), torch.rand(B, S - 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, terms = generator_loss(model(canvas, labels, y, eps_BNK=eps, t_BS=t), f_hat, tokens)
        first = first or terms
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert terms["loss"] < 0.25 * first["loss"]
    assert all(terms[f"acc_{i}"] == 1.0 for i in range(S))


def test_train_writes_checkpoint_and_samples(tokenizer_ckpt, tmp_path):
    res = main(_cfg(tokenizer_ckpt, tmp_path / "run"))
    assert res["steps"] == 4
    assert os.path.exists(res["samples"]) and os.path.exists(tmp_path / "run" / "stages_final.png")
    saved = open_checkpoint(res["checkpoint"]).config
    assert saved["kind"] == "generator" and saved["model"]["latent_hw"] == [4, 4]
    assert saved["tokenizer"]["hash"] == saved["options"]["tokenizer_hash"]
    # the run's CFG schedules become nvg.sample's defaults for this checkpoint (TrainConfig's: the main job's)
    assert (saved["model"]["sample_content_cfg"], saved["model"]["sample_structure_cfg"]) == ([1.0, 7.0], [1.0, 6.0])
    assert saved["model"]["sample_structure_steps"] == 2  # --sample-steps (the tests' and the main job's)
    assert (tmp_path / "run" / "log.jsonl").exists() and (tmp_path / "run" / "loss.png").exists()
    from nvg.sample.__main__ import main as sample_main

    out = tmp_path / "s.npz"
    sample_main(["--ckpt", str(tmp_path / "run"), "--classes", "1", "Trouser", "--n", "2", "--out", str(out),
                 "--structure-steps", "2", "--stages", str(tmp_path / "st.png")])
    import numpy as np

    d = np.load(out)
    assert d["images"].shape == (4, 16, 16, 3) and d["images"].dtype == np.uint8
    assert d["labels"].tolist() == [1, 1, 1, 1]
    assert os.path.exists(tmp_path / "st.png")


def test_resume_is_exact(tokenizer_ckpt, tmp_path):
    full = main(_cfg(tokenizer_ckpt, tmp_path / "full"))
    main(_cfg(tokenizer_ckpt, tmp_path / "cut", stop_after=2))
    resumed = main(_cfg(tokenizer_ckpt, tmp_path / "cut", resume=True))
    assert resumed["steps_this_run"] == 2
    a, b = open_checkpoint(full["checkpoint"]), open_checkpoint(resumed["checkpoint"])
    wa, wb = a.weights(ema=False), b.weights(ema=False)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ea, eb = a.ema_weights(), b.ema_weights()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_resume_refuses_other_model_options_and_another_tokenizer(tokenizer_ckpt, tmp_path):
    main(_cfg(tokenizer_ckpt, tmp_path / "run", stop_after=2))
    with pytest.raises(CheckpointError, match="depth = None in the checkpoint, 2 now"):
        main(_cfg(tokenizer_ckpt, tmp_path / "run", resume=True, depth=2))
    other = tmp_path / "tok2"  # same configuration, other weights
    torch.manual_seed(1)
    tok = Tokenizer(TokenizerConfig(**TOK))
    checkpoint.save(other, 1, tok.state_dict(), {"kind": "tokenizer", "run_id": "t2", "model": tok.config.to_dict()},
                    {"step": 1})
    with pytest.raises(CheckpointError, match="tokenizer_hash"):
        main(_cfg(str(other), tmp_path / "run", resume=True))


def test_bad_config(tokenizer_ckpt, tmp_path):
    with pytest.raises(ValueError, match="null-class-prob"):
        main(_cfg(tokenizer_ckpt, tmp_path, null_class_prob=1.5))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        main(_cfg(str(tmp_path / "nothing"), tmp_path))
    with pytest.raises(ValueError, match="ckpt-every"):
        main(_cfg(tokenizer_ckpt, tmp_path, ckpt_every=0))
    with pytest.raises(ValueError, match="ema-decay"):
        main(_cfg(tokenizer_ckpt, tmp_path, ema_decay=1.0))
    with pytest.raises(ValueError, match="sample_content_cfg must be two finite numbers"):
        main(_cfg(tokenizer_ckpt, tmp_path, sample_content_cfg=(1.0,)))


def test_ema_decay_zero_keeps_no_copy(tokenizer_ckpt, tmp_path):
    """The main job's default (--ema-decay 0): no EMA copy is kept (nor written: no ema.safetensors), nvg.sample
    loads the raw weights, and a cut run resumes exactly."""
    assert TrainConfig().ema_decay == 0.0
    full = main(_cfg(tokenizer_ckpt, tmp_path / "full", ema_decay=0.0))
    ck = open_checkpoint(full["checkpoint"])
    assert not ck.has_ema
    raw = ck.weights(ema=False)
    loaded = NVGGenerator.from_checkpoint(tmp_path / "full").state_dict()  # ema=None: EMA when kept, else raw
    assert all(torch.equal(loaded[k], raw[k]) for k in raw)
    main(_cfg(tokenizer_ckpt, tmp_path / "cut", ema_decay=0.0, stop_after=2))
    resumed = main(_cfg(tokenizer_ckpt, tmp_path / "cut", ema_decay=0.0, resume=True))
    assert resumed["steps_this_run"] == 2
    cut = open_checkpoint(resumed["checkpoint"])
    assert not cut.has_ema
    for k, v in cut.weights(ema=False).items():
        assert torch.equal(v, raw[k]), k


def _torchrun(cfg, port, *extra):
    args = []
    for k, v in dataclasses.asdict(cfg).items():
        if v is None or isinstance(v, bool):
            if v:
                args.append("--" + k.replace("_", "-"))
            continue
        args += ["--" + k.replace("_", "-"), *map(str, v if isinstance(v, tuple | list) else (v,))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "nvg.train", "generator", *args, "--device", "cpu", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _ddp_worker(rank, port, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = main(cfg)
    save_file({k: v.contiguous() for k, v in res["model"].state_dict().items()}, f"{cfg.out_dir}/rank{rank}.st")


def test_ddp_gloo_ranks_hold_identical_weights(tokenizer_ckpt, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(tokenizer_ckpt, tmp_path / "ddp", steps=3, batch_size=2, device="cpu")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, cfg)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    w0, w1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.st")) for r in range(2))
    start = NVGGenerator(GeneratorConfig(**open_checkpoint(tmp_path / "ddp").config["model"])).state_dict()
    assert any(not torch.equal(w0[k], start[k]) for k in w0)  # training moved the weights ...
    for k in w0:  # ... and the averaged gradients kept both ranks identical
        assert torch.equal(w0[k], w1[k]), k
    ckpt = open_checkpoint(tmp_path / "ddp")
    assert ckpt.state()["step"] == 3 and len(ckpt.state()["ranks"]) == 2


@pytest.mark.parametrize("ema_decay", [0.9, 0.0])
def test_fsdp2_gloo_resume_is_exact(tokenizer_ckpt, tmp_path, ema_decay):
    port = 29534 if ema_decay else 29544
    full = _cfg(tokenizer_ckpt, tmp_path / "full", steps=4, batch_size=2, fsdp=True, ema_decay=ema_decay)
    _torchrun(full, port)
    _torchrun(dataclasses.replace(full, out_dir=str(tmp_path / "cut"), stop_after=2), port + 1)
    _torchrun(dataclasses.replace(full, out_dir=str(tmp_path / "cut"), resume=True), port + 2)
    a, b = (open_checkpoint(tmp_path / n) for n in ("full", "cut"))
    assert b.state()["step"] == 4
    # an EMA copy only at decay > 0, under FSDP too; without one the grids gather the weights when drawn (the cut
    # run's grid at its stop, the full run's final grid)
    assert a.has_ema == b.has_ema == (ema_decay > 0)
    assert (tmp_path / "cut" / "samples_000002.png").exists() and (tmp_path / "full" / "samples_final.png").exists()
    if ema_decay:
        ea, eb = a.ema_weights(), b.ema_weights()
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    wa, wb = a.weights(ema=False), b.weights(ema=False)
    assert set(wa) == set(NVGGenerator(GeneratorConfig(**a.config["model"])).state_dict())
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_repa_with_user_supplied_dinov2(tokenizer_ckpt, tmp_path):
    from nvg.train.dinov2 import DINOv2

    torch.manual_seed(0)
    path = tmp_path / "dino.pt"
    torch.save(DINOv2(dim=64, depth=2, heads=1, patch=14, pretrain_grid=5).state_dict(), path)
    res = main(_cfg(tokenizer_ckpt, tmp_path / "run", steps=2, repa_weights=str(path), repa_depth=1))
    assert "repa_0" in res["last_scalars"]
    saved = open_checkpoint(res["checkpoint"]).config["model"]
    assert saved["repa_dim"] == 64 and saved["repa_depth"] == 1
    with pytest.raises(KeyError, match="DINOv2"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
        DINOv2.from_file(str(tmp_path / "bad.pt"))


def test_main_job_keeps_to_its_budget(tmp_path, monkeypatch, capsys):
    """`python -m nvg.train` wiring: tokenizer, then the generator with what is left of the budget as its time cap;
    both write their pictures and the generator says where they are."""
    from nvg.train import main_job as train

    assert train.generator_minutes(14.0, 2.0) == pytest.approx(14.0 - 2.0 - train.MAIN_JOB_RESERVE_MINUTES)
    assert train.generator_minutes(14.0, 20.0) == 1.0  # an overlong tokenizer run still leaves the generator a minute
    seen = {}
    real_main = __import__("nvg.train.generator", fromlist=["main"]).main

    def spy(cfg):
        seen["cfg"] = cfg
        return real_main(cfg)

    monkeypatch.setattr("nvg.train.generator.main", spy)
    t0 = time.time()
    res = train.main_job(str(tmp_path / "main"), budget_minutes=5.0,
                         tokenizer=dict(steps=3, batch_size=4, eval_images=16, image_every=3, ckpt_every=3),
                         generator=dict(steps=3, max_images=64, samples_per_class=1, sample_steps=2, ckpt_every=3),
                         quality_samples=20)
    cap, most = seen["cfg"].max_minutes, 5.0 - train.MAIN_JOB_RESERVE_MINUTES
    assert most - (time.time() - t0) / 60 <= cap < most  # the budget less what the tokenizer used
    assert seen["cfg"].tokenizer == res["tokenizer"]["checkpoint"]
    gen_dir = tmp_path / "main" / "generator"
    assert (gen_dir / "samples_final.png").exists() and (gen_dir / "stages_final.png").exists()
    out = capsys.readouterr().out
    assert str(gen_dir / "samples_final.png") in out
    assert "main job: quality of 20 samples" in out and "| class accuracy (FD-proxy CNN) |" in out
    assert [r["n"] for r in res["quality"] if r["metric"].startswith("FD-proxy")] == [20]
    # run again: it never refuses, it sets the previous run aside and says so in one line
    again = train.main_job(str(tmp_path / "main"), budget_minutes=5.0,
                           tokenizer=dict(steps=2, batch_size=4, eval_images=16, image_every=2, ckpt_every=2),
                           generator=dict(steps=2, max_images=64, samples_per_class=1, sample_steps=2, ckpt_every=2),
                           quality_samples=0)
    assert again["generator"]["steps"] == 2
    out = capsys.readouterr().out
    assert f"moved the previous run in {tmp_path / 'main'} to {tmp_path / 'main.previous'}" in out
    assert (tmp_path / "main.previous" / "generator" / "samples_final.png").exists()
