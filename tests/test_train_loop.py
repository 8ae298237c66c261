"""nvg.train.loop on a toy trainer: non-finite steps, divergence, signals, exact resume, the run's log and curve."""

import json
import os
import signal

import pytest
import torch

from nvg.checkpoint import open_checkpoint
from nvg.ops import NonFiniteError
from nvg.train import common as T
from nvg.train.loop import Diverged, Loop, LoopConfig

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


class Toy:
    """Linear regression with optional sabotage: NaN gradients, NaN activations or a signal at given steps."""

    kind = "toy"

    def __init__(self, loop, nan_grad=(), nan_act=(), sigterm_at=None, poison_at=None):
        torch.manual_seed(0)
        self.loop, self.model = loop, torch.nn.Linear(4, 1)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.05)
        self.ema = T.EMA(self.model, 0.5)
        self.nan_grad, self.nan_act, self.sigterm_at, self.poison_at = set(nan_grad), set(nan_act), sigterm_at, \
            poison_at

    def config(self):
        return {"model": {"in": 4}}

    def options(self):
        return {"in": 4}

    def state_dict(self):
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["optimizer"])

    def step(self, idx, step, epoch):
        if step in self.nan_act:
            raise NonFiniteError("activation")
        loss = (self.model(X[idx]) - Y[idx]).square().mean()
        hook = None
        if step in self.nan_grad:  # a finite loss whose gradient is NaN
            hook = self.model.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        if self.loop.update(self.opt, loss, self.model.parameters(), 1.0, "toy loss"):
            self.ema.update(self.model)
        if hook is not None:
            hook.remove()
        if step == self.poison_at:
            with torch.no_grad():
                self.model.bias.fill_(float("nan"))
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": loss.detach()}


def run(tmp_path, name="run", trainer_kw=None, **kw):
    cfg = LoopConfig(**{"steps": 8, "batch_size": 8, "log_every": 1, "ckpt_every": 4, "image_every": 1000,
                        "device": "cpu", **kw})
    loop = Loop(cfg, tmp_path / name, T.Dist(), "toy")
    loop.prepare()
    trainer = Toy(loop, **(trainer_kw or {}))
    return loop.run(trainer, len(X)), trainer


def test_nan_gradient_with_finite_loss_is_skipped_and_counted(tmp_path):
    res, toy = run(tmp_path, trainer_kw=dict(nan_grad={2, 3}, nan_act={5}))
    assert res["steps"] == 8 and res["bad_steps"] == 3
    for name, w in open_checkpoint(tmp_path / "run").weights(ema=False).items():
        assert torch.isfinite(w).all(), name
    assert all(torch.isfinite(v).all() for v in toy.ema.state_dict().values())


def test_non_finite_steps_in_a_row_stop_with_diverged(tmp_path):
    with pytest.raises(Diverged, match="diverged at step 7: 3 steps in a row"):
        run(tmp_path, max_bad_steps=3, trainer_kw=dict(nan_grad={4, 5, 6}))
    assert open_checkpoint(tmp_path / "run").config["step"] == 4  # the last good checkpoint


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    with pytest.raises(Diverged, match="not finite at step 4; not checkpointed"):
        run(tmp_path, trainer_kw=dict(poison_at=2))
    assert not list((tmp_path / "run").glob("ckpt-*"))


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_is_exact(tmp_path):
    straight, _ = run(tmp_path, "straight")
    stopped, _ = run(tmp_path, "cut", trainer_kw=dict(sigterm_at=2))
    assert stopped["steps"] == 3 and stopped["stopped"].startswith("signal SIGTERM")
    assert open_checkpoint(tmp_path / "cut").config["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is restored
    resumed, _ = run(tmp_path, "cut", resume=True)
    assert resumed["steps_this_run"] == 5
    a, b = (open_checkpoint(tmp_path / n) for n in ("straight", "cut"))
    for k, v in a.weights(ema=False).items():
        assert torch.equal(v, b.weights(ema=False)[k]), k
    assert torch.equal(a.ema_weights()["weight"], b.ema_weights()["weight"])
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))  # no step twice after the resume
    assert (tmp_path / "cut" / "loss.png").exists()


def test_time_cap_stops_with_a_checkpoint(tmp_path):
    res, _ = run(tmp_path, steps=10**6, max_minutes=1e-9)
    assert res["steps"] == 1 and "time budget" in res["stopped"]
    assert open_checkpoint(tmp_path / "run").config["step"] == 1


def test_options_are_validated_before_any_work():
    for bad in (dict(ckpt_every=0), dict(batch_size=0), dict(steps=-1), dict(max_minutes=-1),
                dict(resume=True, overwrite=True)):
        with pytest.raises(ValueError):
            LoopConfig(**bad)


def test_schedule_follows_the_time_budget_under_a_cap(tmp_path):
    free = Loop(LoopConfig(steps=100), tmp_path / "a", T.Dist(), "toy")
    free.time_used = 0.9
    assert free.schedule_step(10) == 10  # no cap: the step itself
    capped = Loop(LoopConfig(steps=100, max_minutes=5), tmp_path / "b", T.Dist(), "toy")
    capped.time_used = 0.85
    assert capped.schedule_step(10) == 85  # 85 % of the budget used: the schedule is 85 % along (its decay)
    assert capped.schedule_step(90) == 90  # never behind the step
