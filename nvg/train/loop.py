"""The one training loop of the four trainers (NVG tokenizer and generator, VAR tokenizer and transformer).

The loop owns everything but the step itself: the run directory (a fresh run refuses a directory holding another run
unless told to --overwrite), resume (weights, optimizers, data position and every rank's RNG, refusing changed model
options), the resumable batch order, the progress bar, the JSON-lines log (and TensorBoard when installed), the time
cap agreed by all ranks, the checkpoint cadence, SIGTERM/SIGINT (finish the step, write a checkpoint, return), and
non-finite steps: `update()` skips an update whose loss or gradient is not finite, counts it, and after
`max_bad_steps` in a row stops with "diverged at step N"; non-finite weights are never checkpointed.

A trainer is an object with:
    kind: str; model: nn.Module (the checkpointed weights); ema: EMA | None
    config() -> dict                 {"model": ..., "train": ..., ...} stored in config.json
    options() -> dict                what a resumed run must match (model options, tokenizer hash)
    step(indices, step, epoch) -> dict[str, Tensor]   one training step (calls loop.update); scalars to log
and optionally: state_dict() / load_state_dict(state) (optimizers, discriminator ...), rank_state() /
load_rank_state(state) (per-rank generators), weights() / load_weights(ckpt) (e.g. FSDP), gather_for_images() (every
rank, before images: e.g. FSDP's gather), images(step, tag),
finish(result) -> dict (final evaluation on the main rank), log_text(scalars) -> dict (progress-bar fields).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .. import checkpoint
from ..ops import NonFiniteError
from . import common as T
from .log import RunLog


class Diverged(RuntimeError):
    """Training stopped because the loss or the gradients stayed non-finite."""


@dataclass
class LoopConfig:
    """Options every trainer shares (each trainer's TrainConfig extends it; every field is a command-line option)."""

    steps: int = 1000
    batch_size: int = 32  # per process
    log_every: int = 25
    image_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2  # this run's newest checkpoints kept on disk
    max_bad_steps: int = 20  # non-finite loss or gradient this many steps in a row: stop with "diverged at step N"
    seed: int = 0
    resume: bool = False  # continue the run in out_dir exactly
    overwrite: bool = False  # start afresh in an out_dir that holds another run (its checkpoints are removed)
    device: str | None = None  # "cpu" / "cuda"; default cuda when available
    threads: int | None = None  # torch CPU threads (default: torch's choice); 1 is fastest on a busy machine
    amp: bool = True  # bf16 autocast (GPU only)
    max_minutes: float | None = None  # stop with a checkpoint after this wall-clock time (None or 0: no limit)
    stop_after: int | None = None  # stop with a checkpoint after this step, as if killed (resume tests)

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "image_every", "ckpt_every", "keep_checkpoints",
                     "max_bad_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.max_minutes is not None and self.max_minutes < 0:
            raise ValueError(f"--max-minutes must be >= 0 (0: no limit), got {self.max_minutes}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {self.stop_after}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")


class _Signals:
    """SIGTERM / SIGINT set a flag (the loop finishes the step and checkpoints); a second SIGINT interrupts."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Loop:
    """One run of one trainer in `run_dir`."""

    def __init__(self, cfg: LoopConfig, run_dir: str | Path, d: T.Dist, desc: str):
        self.cfg, self.run_dir, self.dist, self.desc = cfg, Path(run_dir), d, desc
        self.step, self.bad_steps, self.bad_in_row, self.signalled = 0, 0, 0, False
        self.time_used = 0.0  # share of the --max-minutes budget used so far (this invocation)
        self.run_id = checkpoint.new_run_id()
        self._synced_flags = torch.zeros(2, device=d.device)

    # ------------------------------------------------------------------------------------------------------ set-up
    @classmethod
    def start(cls, cfg: LoopConfig, run_dir: str | Path, desc: str, d: T.Dist | None = None) -> Loop:
        """Threads, the process group (torchrun) and a prepared loop: the usual first lines of a trainer's main."""
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        loop = cls(cfg, run_dir, d or T.init_distributed(cfg.device), desc)
        loop.prepare()
        return loop

    def prepare(self) -> None:
        """Before any work: refuse a directory holding another run (unless resume / overwrite)."""
        if self.dist.is_main:
            checkpoint.prepare_run_dir(self.run_dir, self.cfg.resume, self.cfg.overwrite)
        if self.dist.world_size > 1:
            dist.barrier()

    def _resume(self, trainer) -> tuple[int, int]:
        """Load the newest valid checkpoint (when resuming); returns (epoch, batch in epoch) to start from."""
        cfg, d = self.cfg, self.dist
        has_run = cfg.resume and checkpoint.describe_run(self.run_dir) is not None
        if cfg.resume and not has_run and d.is_main:
            print(f"--resume: no checkpoint in {self.run_dir}, starting from scratch")
        if not has_run:
            T.seed_everything(cfg.seed + 1000 * d.rank)
            return 0, 0
        ckpt = checkpoint.open_checkpoint(self.run_dir, trainer.kind, need_state=True,
                                          log=print if d.is_main else (lambda m: None))
        checkpoint.check_same(ckpt.config.get("options", {}), trainer.options(), f"--resume: the {trainer.kind} run")
        state = ckpt.loaded_state
        if hasattr(trainer, "load_weights"):
            trainer.load_weights(ckpt)
        else:
            checkpoint.load_strict(trainer.model, ckpt.weights(ema=False), f"{ckpt.path}")
            if trainer.ema is not None:
                trainer.ema.load_state_dict(ckpt.ema_weights())
        if hasattr(trainer, "load_state_dict"):
            trainer.load_state_dict(state["trainer"])
        per_rank = state["ranks"][d.rank] if d.rank < len(state["ranks"]) else state["ranks"][0]
        checkpoint.set_rng_state(per_rank["rng"])
        if hasattr(trainer, "load_rank_state"):
            trainer.load_rank_state(per_rank.get("trainer", {}))
        self.step, self.bad_steps = int(state["step"]), int(state.get("bad_steps", 0))
        self.run_id = ckpt.config.get("run_id", self.run_id)
        if d.is_main:
            print(f"{self.desc}: resumed from {ckpt.path} at step {self.step}")
        return int(state["epoch"]), int(state["batch_in_epoch"])

    # --------------------------------------------------------------------------------------------------- the update
    def update(self, opt: torch.optim.Optimizer, loss: Tensor, params, grad_clip: float, name: str = "loss") -> bool:
        """backward, clip the global gradient norm (grad_clip <= 0: measure only), step — unless the loss or the
        gradient is not finite: then the update is skipped and counted. Returns whether it was applied."""
        params = [p for p in params if p.requires_grad]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
        ok = torch.isfinite(norm) & torch.isfinite(loss.detach())
        if self.dist.world_size > 1:  # the same decision on every rank
            ok = ok.float()
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok):
            opt.step()
            self.bad_in_row = 0
            return True
        opt.zero_grad(set_to_none=True)
        self._count_bad(f"{name} or gradient")
        return False

    def _count_bad(self, what: str) -> None:
        self.bad_steps += 1
        self.bad_in_row += 1
        if self.dist.is_main:
            print(f"{self.desc}: step {self.step + 1}: non-finite {what}, update skipped ({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.cfg.max_bad_steps:
            raise Diverged(f"{self.desc}: diverged at step {self.step + 1}: {self.bad_in_row} steps in a row with a "
                           f"non-finite {what} (--max-bad-steps {self.cfg.max_bad_steps}); no checkpoint of "
                           "non-finite weights was written")

    # ------------------------------------------------------------------------------------------------- checkpoints
    def save(self, trainer, epoch: int, next_batch: int) -> None:
        d = self.dist
        mine = {"rng": checkpoint.rng_state()}
        if hasattr(trainer, "rank_state"):
            mine["trainer"] = trainer.rank_state()
        ranks = [mine]
        if d.world_size > 1:
            ranks = [None] * d.world_size
            dist.all_gather_object(ranks, mine)
        weights = trainer.weights() if hasattr(trainer, "weights") else trainer.model.state_dict()
        trainer_state = trainer.state_dict() if hasattr(trainer, "state_dict") else {}  # collectives under FSDP
        if not d.is_main:
            return
        floats = [v for v in weights.values() if v.is_floating_point()]
        ema = trainer.ema.state_dict() if trainer.ema is not None else None
        floats += list(ema.values()) if ema else []
        if floats and not bool(torch.stack([v.detach().isfinite().all().cpu() for v in floats]).all()):
            raise Diverged(f"{self.desc}: the weights are not finite at step {self.step}; not checkpointed")
        config = {**trainer.config(), "kind": trainer.kind, "run_id": self.run_id, "options": trainer.options()}
        state = {"step": self.step, "epoch": epoch, "batch_in_epoch": next_batch, "bad_steps": self.bad_steps,
                 "ranks": ranks, "trainer": trainer_state}
        checkpoint.save(self.run_dir, self.step, weights, config, state, ema, keep=self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------------------------------------------ the run
    def _stop_flags(self, t0: float, signals: _Signals) -> tuple[bool, bool]:
        """(over time, signalled), agreed by all ranks (one small all-reduce per step under torchrun); also the share
        of the time budget used, the same on every rank (see schedule_step)."""
        cap = self.cfg.max_minutes
        used = (time.time() - t0) / (60 * cap) if cap else 0.0
        flags = (float(used > 1), float(signals.received is not None), used)
        if self.dist.world_size > 1:
            t = torch.tensor(flags, device=self.dist.device, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = tuple(t.tolist())
        self.time_used = flags[2]
        return bool(flags[0]), bool(flags[1])

    def schedule_step(self, step: int) -> int:
        """The step an LR schedule should see: the step itself, or, under --max-minutes, the same share of
        cfg.steps as the share of the time budget already used when that is further along, so that a time-capped
        run goes through its warm-up, plateau and decay before the cap (agreed by all ranks)."""
        return max(step, int(self.time_used * self.cfg.steps)) if self.cfg.max_minutes else step

    def run(self, trainer, num_items: int) -> dict:
        """Train until cfg.steps (or the time cap, a signal, stop_after); returns a summary dict."""
        cfg, d = self.cfg, self.dist
        epoch, batch_in_epoch = self._resume(trainer)
        start_step = self.step
        log = RunLog(self.run_dir, enabled=d.is_main, resume_step=self.step)
        batches = T.ResumableBatches(num_items, cfg.batch_size, cfg.seed, d.rank, d.world_size)
        bar = T.progress(cfg.steps, self.step, d.is_main, desc=self.desc)
        t0, stop_reason, last = time.time(), None, {}
        with _Signals() as signals:
            for epoch, b, idx in batches.iterate(epoch, batch_in_epoch):
                if self.step >= cfg.steps:
                    break
                try:
                    scalars = trainer.step(idx, self.step, epoch)
                except NonFiniteError as e:  # NaN / Inf activations inside the forward: the weights diverged
                    self._count_bad(f"activation ({e})")
                    scalars = {}
                self.step += 1
                bar.update(1)
                if d.is_main and scalars and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    values = {k: float(v) for k, v in scalars.items()}  # the only host syncs of the scalars
                    last = values
                    log.write(self.step, values, time.time() - t0)
                    shown = trainer.log_text(values) if hasattr(trainer, "log_text") else values
                    bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
                over, signalled = self._stop_flags(t0, signals)
                if signalled:
                    self.signalled = True
                    stop_reason = f"signal {signals.received or 'on another rank'}: checkpoint written"
                elif over:
                    stop_reason = f"time budget of {cfg.max_minutes} min reached"
                elif cfg.stop_after is not None and self.step >= cfg.stop_after:
                    stop_reason = f"stop_after={cfg.stop_after}"
                if hasattr(trainer, "images") and not signalled and (
                        self.step % cfg.image_every == 0 or self.step == cfg.steps or stop_reason):
                    if hasattr(trainer, "gather_for_images"):  # every rank: a collective under FSDP
                        trainer.gather_for_images()
                    if d.is_main:
                        trainer.images(self.step, "final" if self.step == cfg.steps else f"{self.step:06d}")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stop_reason:
                    self.save(trainer, epoch, b + 1)
                if stop_reason:
                    break
        bar.close()
        result = {"steps": self.step, "steps_this_run": self.step - start_step, "seconds": time.time() - t0,
                  "stopped": stop_reason, "bad_steps": self.bad_steps, "last_scalars": last, "checkpoint": None}
        if d.is_main:
            result["checkpoint"] = str(checkpoint.open_checkpoint(self.run_dir, trainer.kind).path)
            log.close()
            log.plot(self.run_dir / "loss.png")
            if stop_reason and stop_reason.startswith("signal"):
                print(f"{self.desc}: {stop_reason} at step {self.step} ({result['checkpoint']}); "
                      "continue with --resume")
        if d.world_size > 1:
            dist.barrier()
        return result

    @property
    def interrupted(self) -> bool:
        """Stopped by a signal or by stop_after (a simulated kill): the trainer skips its final evaluation."""
        stop_after = self.cfg.stop_after is not None and self.cfg.stop_after <= self.step < self.cfg.steps
        return stop_after or self.signalled
