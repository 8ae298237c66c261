"""`python -m nvg.train var`: both stages run, write checkpoints, and resume exactly after an interruption."""

import dataclasses

import pytest
import torch

from nvg.baselines.var.convert import load_vqvae
from nvg.baselines.var.train import TrainConfig, main
from nvg.checkpoint import CheckpointError, open_checkpoint
from nvg.train.__main__ import parse

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU workloads: see tests/conftest.py

TINY = dict(dataset="fashion-mnist", batch_size=2, tokenizer_steps=2, steps=3, disc="none", eval_samples=0,
            fd_proxy=False, eval_images=8, image_every=1000, ckpt_every=1000, device="cpu", log_every=1)




@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("var")
    result = main(TrainConfig(stage="tokenizer", out_dir=str(out), **TINY))
    return out, result


def test_cli_parses_into_the_config():
    mod, cfg = parse(["var", "--stage", "transformer", "--steps", "7", "--no-fd-proxy", "--top-k", "5"])
    assert mod.__name__ == "nvg.baselines.var.train"
    assert (cfg.stage, cfg.steps, cfg.fd_proxy, cfg.top_k) == ("transformer", 7, False, 5)


def test_tokenizer_stage_writes_a_loadable_checkpoint(tokenizer_run):
    out, result = tokenizer_run
    assert result["tokenizer"]["steps"] == 2 and (out / "tokenizer" / "metrics.json").exists()
    vae = load_vqvae(str(out / "tokenizer"), ema=True, device="cpu")
    assert not vae.training
    idx = vae.encode(torch.zeros(1, 3, 32, 32))
    assert [t.shape[1] for t in idx] == [1, 4, 9, 16, 36, 64]


def test_transformer_resume_is_exact(tokenizer_run, tmp_path):
    out, _ = tokenizer_run
    common = dict(TINY, stage="transformer", vae_checkpoint=str(out / "tokenizer"))
    straight = main(TrainConfig(out_dir=str(tmp_path / "a"), **common))
    assert straight["transformer"]["steps"] == 3
    stopped = main(TrainConfig(out_dir=str(tmp_path / "b"), stop_after=1, **common))
    assert stopped["transformer"]["steps"] == 1
    resumed = main(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **common))
    assert resumed["transformer"]["steps_this_run"] == 2
    a = open_checkpoint(tmp_path / "a" / "transformer").weights(ema=False)
    b = open_checkpoint(tmp_path / "b" / "transformer").weights(ema=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert (tmp_path / "a" / "transformer" / "samples_ema.png").exists()


def test_resume_rejects_a_different_model(tokenizer_run, tmp_path):
    out, _ = tokenizer_run
    common = dict(TINY, stage="transformer", vae_checkpoint=str(out / "tokenizer"), steps=1)
    main(TrainConfig(out_dir=str(tmp_path), **common))
    cfg = TrainConfig(out_dir=str(tmp_path), resume=True, **common)
    with pytest.raises(CheckpointError, match="differs from the checkpoint's: model"):
        # same preset name, different model: the saved configuration is compared field by field
        import nvg.baselines.var.train as train_module

        presets = dict(train_module.VAR_PRESETS)
        train_module.VAR_PRESETS["var-tiny"] = dict(presets["var-tiny"], depth=2)
        try:
            main(dataclasses.replace(cfg, steps=2))
        finally:
            train_module.VAR_PRESETS.update(presets)


def test_ema_decay_zero_keeps_no_copy(tmp_path):
    """Both stages at --ema-decay 0: no EMA copy in the checkpoints, grids and validation from the raw weights."""
    res = main(TrainConfig(stage="both", out_dir=str(tmp_path), **dict(TINY, ema_decay=0.0, eval_samples=2)))
    for stage in ("tokenizer", "transformer"):
        assert not open_checkpoint(tmp_path / stage).has_ema, stage
    assert "val_raw" in res["tokenizer"] and "val_ema" not in res["tokenizer"]
    assert (tmp_path / "tokenizer" / "recon.png").exists() and (tmp_path / "transformer" / "samples.png").exists()
    assert not (tmp_path / "transformer" / "samples_ema.png").exists()
    load_vqvae(str(tmp_path / "tokenizer"), device="cpu")  # the raw weights (no EMA copy kept)


@pytest.mark.parametrize("decay", [1.0, -0.5])
def test_ema_decay_outside_zero_one_is_refused(tmp_path, decay):
    with pytest.raises(ValueError, match=r"--ema-decay must be in \[0, 1\)"):
        main(TrainConfig(out_dir=str(tmp_path), ema_decay=decay))


def test_bad_options_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--stage must be"):
        main(TrainConfig(stage="all", out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown VAR preset"):
        main(TrainConfig(var_preset="var-d99", out_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(TrainConfig(**dict(TINY, stage="transformer", out_dir=str(tmp_path))))
    with pytest.raises(ValueError, match="top_p in"):
        TrainConfig(top_p=0.0)
