"""What the three commands (`python -m nvg.train | nvg.sample | nvg.eval`) share: options generated from a config
dataclass, and expected errors reported as one line on stderr with exit code 2 (NVG_TRACEBACK=1 shows the traceback).

Only the `__main__` modules import this file; the library never does.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable

from .checkpoint import CheckpointError
from .train.loop import Diverged

# errors that mean "the request cannot be done as asked" (bad path, value or file), not a bug
EXPECTED_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                   CheckpointError)


class UsageError(ValueError):
    """A command line argparse refuses (unknown option, a value of the wrong type): reported like any bad value."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing the usage and exiting, so that `run` reports every
    expected error the same way (one line, exit 2) and `main(argv)` raises it when called from Python."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _unoptional(tp):
    """`X | None` -> X; anything else unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _field_type(tp):
    """(parser type, is_bool, nargs) of a dataclass field annotation such as `int`, `str | None`,
    `tuple[float, float]` (nargs 2), `tuple[int, ...] | None` / `list[str]` (nargs "+")."""
    base = _unoptional(tp)
    if base is bool:
        return None, True, None
    if base in (int, float, str):
        return base, False, None
    if typing.get_origin(base) in (tuple, list):
        args = typing.get_args(base)
        inner = args[0] if args else str
        fixed = typing.get_origin(base) is tuple and args and Ellipsis not in args
        return inner, False, (len(args) if fixed else "+")
    return str, False, None


def _help(f: dataclasses.Field, default, text: str | None) -> str:
    text = text or f.metadata.get("help", "")
    if default is dataclasses.MISSING:
        return text or "(required)"
    if default is None and text:
        return text
    shown = " ".join(map(str, default)) if isinstance(default, tuple | list) else default
    return f"{text} (default: {shown})" if text else f"(default: {shown})"


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                       aliases: dict[str, tuple[str, ...]] | None = None, helps: dict[str, str] | None = None,
                       group: str | None = None) -> None:
    """Every field of `cls` becomes `--field-name` (bools: --flag / --no-flag; tuples: several values; fields without
    a default: required). `aliases` adds option strings to a field (e.g. {"gumbel_split": ("--gumbel",)}); `helps`
    supplies help texts for fields whose metadata has none; `group` puts the options under a heading."""
    aliases, helps = aliases or {}, helps or {}
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        opts = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, ())]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        kw = {"dest": f.name, "help": _help(f, default, helps.get(f.name))}
        if default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
        tp, is_bool, nargs = _field_type(hints[f.name])
        if is_bool:
            target.add_argument(*opts, action=argparse.BooleanOptionalAction, **kw)
            continue
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if nargs is not None:
            kw.setdefault("metavar", f.name.upper() if nargs == "+" else ("START", "END") if nargs == 2 else
                          tuple(f"V{i}" for i in range(nargs)))
            target.add_argument(*opts, type=tp, nargs=nargs, **kw)
        else:
            target.add_argument(*opts, type=tp, **kw)


def dataclass_from_args(cls, ns: argparse.Namespace, **extra):
    """The dataclass from parsed options (option lists become tuples where the field is a tuple). Its __post_init__
    validates the values."""
    hints = typing.get_type_hints(cls)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)}
    for name, v in values.items():
        if isinstance(v, list) and (typing.get_origin(_unoptional(hints[name])) is tuple):
            values[name] = tuple(v)
    return cls(**{**values, **extra})


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is available, else "cpu"; any other name is checked (a CUDA device must exist)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s)")
    return device


def run(main: Callable[[], object], prog: str) -> None:
    """Run a command's main: expected errors print `prog: error: message` and exit 2, divergence exits 1."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Diverged as e:
        if os.environ.get("NVG_TRACEBACK"):
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except EXPECTED_ERRORS as e:
        if os.environ.get("NVG_TRACEBACK"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) and e.filename:
            msg = f"{e.strerror or msg}: {e.filename}"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


def check_output_path(path: str, suffixes: tuple[str, ...] | None = None, what: str = "output") -> str:
    """Validate an output file path before any work: a known suffix, and a parent that is (or can be made) a
    writable directory. Creates the parent directory."""
    if suffixes is not None and not path.lower().endswith(suffixes):
        raise ValueError(f"{what} {path!r} must end with one of {', '.join(suffixes)}")
    if os.path.isdir(path):
        raise IsADirectoryError(21, "is a directory, expected a file name", path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise PermissionError(13, f"cannot create the folder for the {what}", parent) from e
    try:  # a real probe: os.access says yes to root on read-only mounts and in /proc
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".nvg-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(13, f"cannot write the {what} into this folder ({e.strerror})", parent) from None
    return path


def check_input_path(path: str, what: str = "input", kind: str = "any") -> str:
    """Validate an input path before any work: it exists and is a file (kind="file"), a folder (kind="dir") or
    either (kind="any"), and is readable."""
    if not os.path.exists(path):
        raise FileNotFoundError(2, f"no such {what}", path)
    if kind == "file" and os.path.isdir(path):
        raise IsADirectoryError(21, f"the {what} is a folder, expected a file", path)
    if kind == "dir" and not os.path.isdir(path):
        raise NotADirectoryError(20, f"the {what} must be a folder", path)
    if not os.access(path, os.R_OK):
        raise PermissionError(13, f"cannot read the {what}", path)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[typing.BinaryIO], None]) -> None:
    """Write a file through a temporary file in the same folder, renamed into place (os.replace): a failure or a
    kill leaves either the old file or none, never a partial one. `write(f)` fills the open binary file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600: give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
