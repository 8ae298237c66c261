"""nvg.checkpoint: atomic saves, newest-valid resolution with fallback, strict weights, safe training state."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from nvg import checkpoint
from nvg.checkpoint import CheckpointError, open_checkpoint
from nvg.model import GeneratorConfig, NVGGenerator
from nvg.tokenizer import Tokenizer


def _save(run, step, run_id="a", weights=None, state=None, kind="toy", ema=None):
    weights = weights if weights is not None else {"w": torch.full((3,), float(step))}
    return checkpoint.save(run, step, weights, {"kind": kind, "run_id": run_id, "model": {}},
                           state if state is not None else {"step": step}, ema=ema)


def test_newest_valid_checkpoint_and_latest(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s, ema={"w": torch.zeros(3)})
    c = open_checkpoint(tmp_path, "toy", need_state=True)
    assert c.path.name == "ckpt-00000003" and c.loaded_state["step"] == 3 and c.config["step"] == 3
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-00000002", "ckpt-00000003"]  # keep=2
    assert torch.equal(c.weights(ema=False)["w"], torch.full((3,), 3.0))
    assert torch.equal(c.weights()["w"], torch.zeros(3))  # EMA over the model weights when kept
    with pytest.raises(CheckpointError, match="'toy' checkpoint, not a 'tokenizer' one"):
        open_checkpoint(tmp_path, "tokenizer")


def test_corrupt_newest_is_reported_and_the_previous_used(tmp_path, capsys):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    path = newest / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-5])  # truncated
    logs = []
    c = open_checkpoint(tmp_path, "toy", log=logs.append)
    assert c.path.name == "ckpt-00000001"
    assert "ckpt-00000002" in logs[0] and "model.safetensors" in logs[0] and "ckpt-00000001" in logs[1]
    (tmp_path / "ckpt-00000001" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        open_checkpoint(tmp_path, "toy", log=logs.append)


class _Payload:
    """Unpickling this runs code: it must never happen when a training state is read."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_training_state_is_read_without_running_code(tmp_path):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    marker = str(tmp_path / "pwned")
    with open(bad / "state.pt", "wb") as f:
        pickle.dump({"step": 2, "x": _Payload(marker)}, f)
    torch.save({"step": 2, "x": _Payload(marker)}, bad / "state.pt")
    logs = []
    c = open_checkpoint(tmp_path, "toy", need_state=True, log=logs.append)
    assert not os.path.exists(marker)  # never executed
    assert c.path.name == "ckpt-00000001" and "state.pt cannot be read safely" in logs[0]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.normal()  # cached Gaussians are part of the state
    state = checkpoint.rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.normal(), torch.rand(1).item())
    torch.save(state, tmp_path / "rng.pt")
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.normal(), torch.rand(1).item())
    assert got == expected


def test_pruning_keeps_other_runs_and_orders_by_step(tmp_path):
    _save(tmp_path, 100, run_id="old")
    for s in (1, 2, 3):
        _save(tmp_path, s, run_id="new")
    names = [p.name for p in checkpoint.checkpoints(tmp_path)]
    assert names == ["ckpt-00000002", "ckpt-00000003", "ckpt-00000100"]  # the other run's checkpoint is kept
    assert (tmp_path / "latest").read_text().strip() == "ckpt-00000003"  # latest is the checkpoint just written
    _save(tmp_path, 123456789, run_id="new")  # nine digits: ordered by number, not by name
    assert checkpoint.checkpoints(tmp_path)[-1].name == "ckpt-123456789"


def test_fresh_run_refuses_a_directory_with_another_run(tmp_path):
    checkpoint.prepare_run_dir(tmp_path / "empty", resume=False, overwrite=False)  # nothing there: fine
    _save(tmp_path, 5)
    with pytest.raises(CheckpointError, match=r"holds another run \(1 checkpoint\(s\), newest ckpt-00000005"):
        checkpoint.prepare_run_dir(tmp_path, resume=False, overwrite=False)
    checkpoint.prepare_run_dir(tmp_path, resume=True, overwrite=False)
    assert checkpoint.checkpoints(tmp_path)
    checkpoint.prepare_run_dir(tmp_path, resume=False, overwrite=True)
    assert not checkpoint.checkpoints(tmp_path) and not (tmp_path / "latest").exists()


def test_missing_unexpected_and_misshaped_tensors_are_refused(tmp_path):
    tok = Tokenizer("test-ae-16px-4x4")
    sd = tok.state_dict()
    cfg = {"kind": "tokenizer", "run_id": "r", "model": tok.config.to_dict()}
    dropped = {k: v for k, v in sd.items() if k != "decoder.conv_out.conv.bias"}
    checkpoint.save(tmp_path / "a", 1, dropped, cfg, {})
    with pytest.raises(CheckpointError, match="missing key 'decoder.conv_out.conv.bias'"):
        Tokenizer.from_checkpoint(tmp_path / "a")
    checkpoint.save(tmp_path / "b", 1, {**sd, "extra": torch.zeros(1)}, cfg, {})
    with pytest.raises(CheckpointError, match="unexpected key 'extra'"):
        Tokenizer.from_checkpoint(tmp_path / "b")
    gen = NVGGenerator(GeneratorConfig.from_name("nvg-test"))
    gsd = {**gen.state_dict(), "cls_head.linear.weight": torch.zeros(3, 3)}
    checkpoint.save(tmp_path / "c", 1, gsd, {"kind": "generator", "run_id": "r",
                                             "model": GeneratorConfig.from_name("nvg-test").__dict__}, {})
    with pytest.raises(CheckpointError, match="'cls_head.linear.weight' has shape \\(3, 3\\)"):
        NVGGenerator.from_checkpoint(tmp_path / "c")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        open_checkpoint(tmp_path / "b").weights(ema=True)


def test_check_same_names_the_difference():
    checkpoint.check_same({"a": (1, 2), "b": 3}, {"a": [1, 2], "b": 3}, "x")  # tuples as they read back from JSON
    with pytest.raises(CheckpointError, match="b = 3 in the checkpoint, 4 now"):
        checkpoint.check_same({"a": 1, "b": 3}, {"a": 1, "b": 4}, "the run")
