"""Checkpoints, in one place: save, find the newest valid one, load weights strictly, load training state safely.

Layout (one directory per save, `run_dir/ckpt-<step>/`):
    model.safetensors   model weights                     ema.safetensors   EMA weights (when kept)
    config.json         {"kind", "run_id", "step", "model", "train", ...}
    state.pt            training state: tensors, numbers, strings, lists and dicts only (RNG states as tensors),
                        read with `torch.load(weights_only=True)`: a run directory from elsewhere cannot run code
`run_dir/latest` names the newest complete checkpoint. Files are written into a temporary directory that is renamed
into place, so a run killed at any moment leaves the previous checkpoint intact. A checkpoint that cannot be read
(truncated, corrupt) is reported by name and the previous valid one of the run is used instead.

Every loader and trainer of NVG and of the VAR baseline goes through this module; the model classes add one-line
`from_checkpoint` methods on top of `load_model`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch import Tensor

StateDict = dict[str, Tensor]
_CKPT = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: absent, unreadable, of another kind, or not matching the model."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint directory whose files cannot be read back (the previous one of its run may still be good)."""


# ----------------------------------------------------------------------------------------------------------------- save
def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(run_dir: str | os.PathLike, step: int, weights: Mapping[str, Tensor], config: dict, state: dict,
         ema: Mapping[str, Tensor] | None = None, keep: int = 2) -> Path:
    """Write `run_dir/ckpt-<step>/` atomically, point `run_dir/latest` at it, and keep this run's newest `keep`.

    Args:
        weights / ema: state dicts (tensors are copied to the CPU). config: JSON-serialisable, with "kind" and
            "run_id" (pruning only ever removes checkpoints of the same run_id). state: what `torch.load` with
            weights_only=True reads back (tensors, numbers, strings, None, lists, tuples, dicts).
    """
    if "kind" not in config or "run_id" not in config:
        raise ValueError("checkpoint config needs 'kind' and 'run_id'")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:08d}"
    tmp = run_dir / f".tmp-ckpt-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    (tmp / "config.json").write_text(json.dumps({**config, "step": step}, indent=2, default=str))
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    atomic_write_text(run_dir / "latest", final.name + "\n")
    if keep > 0:
        mine = [p for p in checkpoints(run_dir) if _run_id(p) == config["run_id"]]
        for old in mine[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob(".tmp-ckpt-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _run_id(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / "config.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------------------- find
def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The `ckpt-<step>` directories of a run, oldest first (by step, not by name)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def describe_run(run_dir: str | os.PathLike) -> str | None:
    """One line about the run a directory holds ("3 checkpoints, newest ckpt-00000500 (tokenizer)"); None if empty."""
    found = checkpoints(run_dir)
    if not found and not (Path(run_dir) / "latest").exists():
        return None
    kind = None
    if found:
        try:
            kind = json.loads((found[-1] / "config.json").read_text()).get("kind")
        except (OSError, ValueError):
            kind = "unreadable"
    newest = found[-1].name if found else "none"
    return f"{len(found)} checkpoint(s), newest {newest}" + (f" ({kind})" if kind else "")


def _read_config(ckpt: Path) -> dict:
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{ckpt}: no config.json") from None
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{ckpt}: config.json is unreadable ({e})") from None
    if not isinstance(config, dict):
        raise CorruptCheckpoint(f"{ckpt}: config.json is not an object")
    return config


def _check_file(path: Path) -> None:
    """A safetensors file whose header parses and whose size matches the tensors the header lists: a truncated or
    half-written file fails here, from its header alone (the tensors are read later, once)."""
    if not path.is_file():
        raise CorruptCheckpoint(f"{path.parent}: {path.name} is missing")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            raise ValueError(f"{size} bytes, the header lists {8 + n + max(ends, default=0)}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CorruptCheckpoint(f"{path.parent}: {path.name} is unreadable ({e})") from None


class Checkpoint:
    """One checkpoint directory: its config, weights and (on demand) training state."""

    def __init__(self, path: Path, config: dict):
        self.path, self.config = path, config

    def _file(self, name: str) -> StateDict:
        return load_file(str(self.path / name))

    @property
    def has_ema(self) -> bool:
        return (self.path / "ema.safetensors").is_file()

    def weights(self, ema: bool | None = None) -> StateDict:
        """Model weights; ema=True: the EMA copy over them (non-float buffers come from the model file);
        ema=None: EMA when the run kept it; ema=False: the raw weights."""
        sd = self._file("model.safetensors")
        if ema or (ema is None and self.has_ema):
            if not self.has_ema:
                raise CheckpointError(f"{self.path}: this run kept no EMA weights (ema.safetensors)")
            sd.update(self._file("ema.safetensors"))
        return sd

    def ema_weights(self) -> StateDict:
        if not self.has_ema:
            raise CheckpointError(f"{self.path}: this run kept no EMA weights (ema.safetensors)")
        return self._file("ema.safetensors")

    def state(self, map_location="cpu") -> dict:
        """The training state, read with weights_only=True (no code in the file is ever run)."""
        path = self.path / "state.pt"
        if not path.is_file():
            raise CorruptCheckpoint(f"{self.path}: state.pt is missing")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors have many types; all mean "not usable"
            raise CorruptCheckpoint(f"{self.path}: state.pt cannot be read safely ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''})") from None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, kind={self.config.get('kind')!r}, step={self.config.get('step')})"


def _open_one(ckpt: Path, kind: str | None, need_state: bool) -> Checkpoint:
    config = _read_config(ckpt)
    if kind is not None and config.get("kind") != kind:
        raise CheckpointError(f"{ckpt} is a {config.get('kind')!r} checkpoint, not a {kind!r} one")
    _check_file(ckpt / "model.safetensors")
    if (ckpt / "ema.safetensors").exists():
        _check_file(ckpt / "ema.safetensors")
    c = Checkpoint(ckpt, config)
    if need_state:
        c.loaded_state = c.state()
    return c


def open_checkpoint(path: str | os.PathLike, kind: str | None = None, need_state: bool = False,
                    log: Callable[[str], None] | None = None) -> Checkpoint:
    """A readable checkpoint of `kind` from a checkpoint directory or a run directory.

    In a run directory the one `latest` names comes first, then the others newest first: a corrupt one is reported
    (through `log`, default stderr) by name and the previous valid one is used. With need_state the training state is
    read too (`.loaded_state`). Raises CheckpointError when there is none, or when one is of another kind.
    """
    path = Path(path)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    if is_checkpoint_dir(path) and not (path / "latest").exists():
        return _open_one(path, kind, need_state)
    order = list(reversed(checkpoints(path)))
    latest = path / "latest"
    if latest.is_file():
        named = path / latest.read_text().strip()
        if named in order:
            order.remove(named)
            order.insert(0, named)
    if not order:
        what = f"{kind} " if kind else ""
        raise CheckpointError(f"no {what}checkpoint in {path} (neither a checkpoint directory nor a run directory "
                              "with ckpt-* directories)")
    errors = []
    for ckpt in order:
        try:
            c = _open_one(ckpt, kind, need_state)
        except CorruptCheckpoint as e:
            log(f"warning: {e}; trying the previous checkpoint")
            errors.append(str(e))
            continue
        if errors:
            log(f"using {c.path.name} instead")
        return c
    raise CheckpointError(f"no readable checkpoint in {path}: " + "; ".join(errors))


# ------------------------------------------------------------------------------------------------------ strict weights
def check_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor], what: str) -> None:
    """Raise CheckpointError naming the first wrong-shaped, missing or unexpected key (and how many there are)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{what}: key {k!r} has shape {tuple(state_dict[k].shape)}, the model expects "
                              f"{tuple(expected[k].shape)} ({len(wrong)} wrong-shaped key(s) in all)")
    if missing:
        raise CheckpointError(f"{what}: missing key {missing[0]!r} ({len(missing)} missing: {missing[:5]})")
    if unexpected:
        raise CheckpointError(f"{what}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected: "
                              f"{unexpected[:5]})")


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], what: str) -> nn.Module:
    """Check every key and shape (naming the first problem), then load."""
    check_state_dict(module, state_dict, what)
    module.load_state_dict(state_dict, strict=True)
    return module


def load_model(path: str | os.PathLike, kind: str, build: Callable[[dict], nn.Module], ema: bool | None = None,
               device="cpu") -> tuple[nn.Module, Checkpoint]:
    """(module in eval mode, its checkpoint): `build(config["model"])` makes the module, whose weights (EMA when kept,
    unless ema=False) are loaded strictly."""
    ckpt = open_checkpoint(path, kind)
    module = build(ckpt.config["model"])
    load_strict(module, ckpt.weights(ema), f"{kind} checkpoint {ckpt.path}")
    return module.to(device).eval(), ckpt


def check_same(saved: Mapping, current: Mapping, what: str) -> None:
    """Raise CheckpointError naming the first field where a saved configuration differs from the current one."""
    norm = lambda d: json.loads(json.dumps(dict(d), default=str))  # noqa: E731 - tuples vs lists as on disk
    saved, current = norm(saved), norm(current)
    diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        k = diff[0]
        raise CheckpointError(f"{what} differs from the checkpoint's: {k} = {saved.get(k)!r} in the checkpoint, "
                              f"{current.get(k)!r} now ({len(diff)} field(s) differ: {diff})")


def content_hash(state_dict: Mapping[str, Tensor]) -> str:
    """A hash of a state dict's names, dtypes, shapes and values (identifies a tokenizer by content, not path)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Tensor]:
    """Python, NumPy, torch (and CUDA) generator states as tensors (storable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor([version, *mt], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Tensor]) -> None:
    py = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), gauss[0] if gauss else None))
    pos, has_gauss = state["numpy_pos"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ------------------------------------------------------------------------------------------------------------ run dirs
def prepare_run_dir(run_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a directory that holds another run, unless told to resume or overwrite.

    overwrite removes the previous run's checkpoints (and `latest`); the pictures and logs it wrote are replaced as the
    new run writes its own."""
    run_dir = Path(run_dir)
    held = describe_run(run_dir)
    if resume or held is None:
        return
    if not overwrite:
        raise CheckpointError(f"{run_dir} holds another run ({held}): pass --resume to continue it or --overwrite "
                              "to replace it")
    for p in checkpoints(run_dir):
        shutil.rmtree(p)
    (run_dir / "latest").unlink(missing_ok=True)
    for p in ("log.jsonl",):
        (run_dir / p).unlink(missing_ok=True)
