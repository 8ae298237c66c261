"""Tokenizer training: exact resume, DDP (gloo, 2 CPU processes), stage-wise reconstruction, configuration checks."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from nvg.checkpoint import CheckpointError, open_checkpoint
from nvg.tokenizer import Tokenizer
from nvg.train import __main__ as cli
from nvg.train import common as T
from nvg.train.tokenizer import TrainConfig, main

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU workloads: see tests/conftest.py

BASE = TrainConfig(preset="test-ae-16px-4x4", dataset="shapes", batch_size=8, steps=6, lr=1e-3, log_every=2,
                   image_every=1000, ckpt_every=1000, eval_images=16, device="cpu", ema_decay=0.9)


def run(tmp_path, name, **kw):
    return main(dataclasses.replace(BASE, out_dir=str(tmp_path / name), **kw))


def latest(run_dir):
    return open_checkpoint(run_dir).path


def state(ckpt):
    return open_checkpoint(ckpt).state()


def weights(ckpt, ema=False):
    return load_file(str(ckpt / ("ema.safetensors" if ema else "model.safetensors")))


def assert_same_state(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for k, v in weights(a, ema=True).items():
        assert torch.equal(v, weights(b, ema=True)[k]), f"ema {k}"
    sa, sb = state(a), state(b)
    assert (sa["step"], sa["epoch"], sa["batch_in_epoch"]) == (sb["step"], sb["epoch"], sb["batch_in_epoch"])
    da, db = sa["trainer"]["disc_optimizer"], sb["trainer"]["disc_optimizer"]
    assert torch.equal(da["state"][0]["exp_avg"], db["state"][0]["exp_avg"])




def test_resume_is_exact(tmp_path):
    # a straight run vs a run stopped after 3 steps (as if killed; checkpoint at the stop) and resumed
    run(tmp_path, "straight")
    stopped = run(tmp_path, "resumed", stop_after=3)
    assert not (tmp_path / "resumed" / "metrics.json").exists()  # a simulated kill skips the final evaluation
    assert stopped["steps"] == 3 and "val_raw" not in stopped
    resumed = run(tmp_path, "resumed", resume=True)
    assert resumed["steps"] == 6 and resumed["steps_this_run"] == 3
    assert_same_state(latest(tmp_path / "straight"), latest(tmp_path / "resumed"))
    for f in ("recon_raw.png", "stages_raw.png", "recon_ema.png", "stages_ema.png", "metrics.json", "log.jsonl",
              "loss.png"):
        assert (tmp_path / "resumed" / f).exists(), f


def _start_and_signal(out, steps, sig):
    """Start `python -m nvg.train tokenizer` and send it `sig` once its first checkpoint exists (mid-run)."""
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "nvg.train", "tokenizer", "--preset", BASE.preset, "--dataset", BASE.dataset,
            "--batch-size", str(BASE.batch_size), "--lr", str(BASE.lr), "--ema-decay", str(BASE.ema_decay),
            "--log-every", "2", "--image-every", "1000", "--eval-images", "16", "--device", "cpu", "--threads", "1",
            "--steps", str(steps), "--ckpt-every", "2", "--disc", "none", "--out-dir", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("ckpt-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the child ended before it could be signalled"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout + stderr


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_or_terminated_process_resumes_exactly(tmp_path, sig):
    import signal

    steps = 400  # far more than the few steps before the first checkpoint: the signal lands mid-run
    out = tmp_path / "killed"
    rc, text = _start_and_signal(out, steps, getattr(signal, sig))
    stopped_at = state(latest(out))["step"]
    assert 0 < stopped_at < steps  # stopped mid-run, after a checkpoint
    if sig == "SIGKILL":
        assert rc == -signal.SIGKILL
    else:  # the step in flight is finished, checkpointed, and the process exits cleanly
        assert rc == 0, text[-2000:]
        assert f"signal SIGTERM: checkpoint written at step {stopped_at}" in text
        assert not (out / "metrics.json").exists()
    kw = dict(steps=stopped_at + 4, ckpt_every=2, disc="none")  # a few more steps: the same as a straight run
    run(tmp_path, "straight", **kw)
    res = run(tmp_path, "killed", resume=True, **kw)
    assert res["steps"] == stopped_at + 4 and res["steps_this_run"] == 4
    a, b = latest(tmp_path / "straight"), latest(out)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def image_folder(root, n=24):
    """A tiny ImageNet-layout folder (2 classes, 20x20 RGB PNGs): random 16 px crops use the torch RNG."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        px = torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(px).save(d / f"{i}.png")
    return str(root)


def test_resume_across_ibq_and_epoch_boundary(tmp_path):
    # 24 images / batch 8 = 3 batches per epoch: IBQ in epoch 0, argmin afterwards; stop inside epoch 1
    kw = dict(dataset=image_folder(tmp_path / "data"), steps=8, ibq_epochs=1)
    run(tmp_path, "a", **kw)
    run(tmp_path, "b", stop_after=4, **kw)
    assert state(latest(tmp_path / "b"))["epoch"] == 1
    run(tmp_path, "b", resume=True, **kw)
    assert_same_state(latest(tmp_path / "a"), latest(tmp_path / "b"))
    assert state(latest(tmp_path / "a"))["epoch"] == 2


def test_stages_reduce_reconstruction_error(tmp_path):
    res = run(tmp_path, "quality", steps=120, disc="none", ibq_epochs=0, lr=3e-3, batch_size=16, log_every=40)
    tok = Tokenizer.from_checkpoint(tmp_path / "quality", ema=False)
    from nvg.data import load_dataset

    x, _ = T.collate(load_dataset("shapes", "val", 16), list(range(64)))
    vgs = tok.encode(x)
    errs = [(img - x).square().mean().item() for img in tok.decode_stages(vgs)]
    assert len(errs) == tok.num_stages == 5
    for i in range(1, len(errs)):
        assert errs[i] <= errs[i - 1] * 1.02, errs  # adding a stage does not make the reconstruction worse
    assert errs[-1] < 0.7 * errs[0], errs
    lat = [(vgs.f_hat if i == 4 else vgs.canvas[:, i + 1]) for i in range(5)]
    f = tok.encoder(x).flatten(2).transpose(1, 2)
    lat_errs = [(c - f).square().mean().item() for c in lat]
    assert all(b <= a + 1e-6 for a, b in zip(lat_errs, lat_errs[1:])), lat_errs
    assert res["val_raw"]["psnr"] > 12


def test_bad_configurations(tmp_path):
    run(tmp_path, "r", steps=2, disc="none")
    with pytest.raises(ValueError, match="latent_size"):
        run(tmp_path, "r", steps=4, resume=True, disc="none", preset="tiny-ae-32px-8x8")
    with pytest.raises(CheckpointError, match="disc = 'none' in the checkpoint, 'patch' now"):
        run(tmp_path, "r", steps=4, resume=True)
    with pytest.raises(ValueError, match="disc"):
        run(tmp_path, "x", disc="dino")
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        run(tmp_path, "x", preset="huge")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Tokenizer.from_checkpoint(tmp_path / "nothing")


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_ema_decay_outside_zero_one_is_refused(tmp_path, decay):
    with pytest.raises(ValueError, match=r"--ema-decay must be in \[0, 1\)"):
        run(tmp_path, "x", ema_decay=decay)


def test_ema_decay_zero_keeps_no_copy_and_resumes_exactly(tmp_path):
    straight = run(tmp_path, "straight", ema_decay=0.0)
    assert not open_checkpoint(tmp_path / "straight").has_ema and "val_ema" not in straight
    assert (tmp_path / "straight" / "recon_raw.png").exists() and not (tmp_path / "straight" / "recon_ema.png").exists()
    run(tmp_path, "resumed", ema_decay=0.0, stop_after=3)
    run(tmp_path, "resumed", ema_decay=0.0, resume=True)
    a, b = weights(latest(tmp_path / "straight")), weights(latest(tmp_path / "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    Tokenizer.from_checkpoint(tmp_path / "straight")  # loads the raw weights


def test_fresh_run_into_an_existing_run_is_refused(tmp_path):
    first = run(tmp_path, "r", steps=2, disc="none")
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    with pytest.raises(CheckpointError, match="holds another run .* --resume .* --overwrite"):
        run(tmp_path, "r", steps=2, disc="none")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before  # nothing was touched
    again = run(tmp_path, "r", steps=3, disc="none", overwrite=True, seed=1)
    assert again["steps"] == 3 and again["checkpoint"] != first["checkpoint"]
    assert [p.name for p in (tmp_path / "r").glob("ckpt-*")] == ["ckpt-00000003"]


def test_lr_schedules_and_batches():
    f = [T.lr_factor(s, 100, "wsd", warmup_steps=10, decay_start=0.8, final_ratio=0.1) for s in range(101)]
    assert f[0] == 0.005 and f[10] == 1.0 and f[79] == 1.0 and abs(f[100] - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    c = [T.lr_factor(s, 100, "cosine", final_ratio=0.0) for s in (0, 50, 100)]
    assert c[0] == 1.0 and abs(c[1] - 0.5) < 1e-9 and abs(c[2]) < 1e-9
    with pytest.raises(ValueError, match="schedule"):
        T.lr_factor(0, 10, "step")
    ranks = [T.ResumableBatches(20, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    e0 = [sum(r.epoch_batches(0), []) for r in ranks]
    assert len(e0[0]) == len(e0[1]) == 9 and not set(e0[0]) & set(e0[1])
    it = ranks[0].iterate(0, 2)
    assert next(it) == (0, 2, ranks[0].epoch_batches(0)[2]) and next(it)[:2] == (1, 0)
    assert ranks[0].epoch_batches(1) != ranks[0].epoch_batches(0)


def test_cli_parses_into_the_dataclass():
    mod, cfg = cli.parse(["tokenizer", "--steps", "5", "--no-amp", "--preset", "test-ae-16px-4x4",
                          "--max-minutes", "1.5"])
    assert mod.TrainConfig is TrainConfig
    assert (cfg.steps, cfg.amp, cfg.preset, cfg.max_minutes, cfg.resume) == (5, False, "test-ae-16px-4x4", 1.5, False)
    with pytest.raises(ValueError, match="unknown subcommand"):
        cli.parse(["nonsense"])


def _ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = main(dataclasses.replace(BASE, out_dir=out_dir, steps=3, eval_images=8))
    save_file(res["model"].state_dict(), f"{out_dir}/rank{rank}.safetensors")


def test_ddp_gloo_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = tmp_path / "ddp"
    out.mkdir()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    w0, w1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    for k, v in w0.items():  # gradients were averaged: both ranks hold the same weights
        assert torch.equal(v, w1[k]), k
    ckpt = latest(tmp_path / "ddp")
    assert state(ckpt)["step"] == 3 and len(state(ckpt)["ranks"]) == 2
    initial = Tokenizer("test-ae-16px-4x4")
    assert not torch.equal(weights(ckpt)["decoder.conv_out.conv.bias"], initial.decoder.conv_out.conv.bias.detach())


def lpips_weight_file(path):
    """Random weights in the torchvision VGG16 + lpips layout (the real ones cannot be downloaded here)."""
    from nvg.train.lpips import LPIPS

    torch.manual_seed(0)
    m = LPIPS()
    sd = {k: v for k, v in m.state_dict().items() if k.startswith("features.")}
    sd.update({f"lin{i}.model.1.weight": m.lins[i].weight.abs() for i in range(5)})
    torch.save(sd, path)
    return str(path)


def test_lpips_from_user_weights(tmp_path):
    from nvg.train.lpips import LPIPS

    spec = lpips_weight_file(tmp_path / "lpips.pth")
    lp = LPIPS.from_file(spec)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.allclose(lp(x, x), torch.zeros(2), atol=1e-6)
    assert (lp(x, y) > 0).all()
    bad = torch.load(spec)
    bad.pop("lin3.model.1.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="lin|lins.3"):
        LPIPS.from_file(str(tmp_path / "bad.pth"))
    res = run(tmp_path, "lp", steps=2, lpips_weights=spec, disc="none")  # the training loss accepts it
    assert res["steps"] == 2


@pytest.mark.slow
def test_tiny_preset_quality_guard(tmp_path):
    """Loose guard of the README figure: 250 steps of the main job's tokenizer settings (about 2 minutes on one
    core) already reach 17 dB validation PSNR on the embedded Fashion-MNIST; the full 10-minute run goes further."""
    from nvg.train.main_job import MAIN_JOB_TOKENIZER

    cfg = TrainConfig(**{**MAIN_JOB_TOKENIZER, "steps": 250, "max_minutes": None, "eval_images": 256, "threads": 1,
                         "device": "cpu", "image_every": 250, "ckpt_every": 250, "out_dir": str(tmp_path / "tiny")})
    res = main(cfg)
    assert res["val_raw"]["psnr"] > 17.0, res["val_raw"]
    assert (tmp_path / "tiny" / "stages_ema.png").exists() and (tmp_path / "tiny" / "recon_ema.png").exists()


def test_dino_discriminator_from_user_weights(tmp_path):
    from nvg.train.dino_disc import DinoDiscriminator, FrozenViT, diff_augment

    torch.manual_seed(0)
    vit = FrozenViT(depth=3, key_depths=(2,))  # a truncated random ViT-S/16 in the DINO key layout
    path = tmp_path / "dino.pth"
    torch.save({k: v.normal_(0, 0.02) if v.dim() > 1 else v for k, v in vit.state_dict().items()}, path)
    d = DinoDiscriminator.from_file(str(path))
    assert len(d.heads) == 2 and not any(p.requires_grad for p in d.dino.parameters())
    qkv_bias = d.dino.blocks[0].attn.qkv.bias
    assert qkv_bias[384:768].abs().sum() == 0  # k-bias zeroed as official
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    logits = d(diff_augment(x))
    assert logits.shape == (2, 2 * 196)
    logits.mean().backward()
    assert x.grad.abs().sum() > 0 and d.heads[0][0][0].parametrizations.weight.original.grad is not None
    bad = torch.load(path)
    bad.pop("pos_embed")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="pos_embed"):
        DinoDiscriminator.from_file(str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="dino-weights"):
        run(tmp_path, "x", disc="dino")
    # two training steps with it, a stop, and an exact resume (heads, LeCAM state and optimizer are checkpointed)
    kw = dict(disc="dino", dino_weights=str(path), batch_size=2, steps=2, preset="test-ae-16px-4x4")
    run(tmp_path, "a", **kw)
    run(tmp_path, "b", stop_after=1, **kw)
    run(tmp_path, "b", resume=True, **kw)
    wa, wb = weights(latest(tmp_path / "a")), weights(latest(tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "lecam" in state(latest(tmp_path / "b"))["trainer"]
