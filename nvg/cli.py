"""What the three commands (`python -m nvg.train | nvg.sample | nvg.eval`) share: options generated from a config
dataclass, and expected errors reported as one line on stderr with exit code 2 (NVG_TRACEBACK=1 shows the traceback).

Only the `__main__` modules import this file; the library never does.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable

from .checkpoint import CheckpointError
from .train.loop import Diverged

# errors that mean "the request cannot be done as asked" (bad path, value or file), not a bug
EXPECTED_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                   CheckpointError)


def _field_type(tp):
    """(parser type, is_bool) of a dataclass field annotation such as `int`, `str | None`, `float | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if (typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1) else tp
    if base is bool:
        return None, True
    if base in (int, float, str):
        return base, False
    if typing.get_origin(base) in (tuple, list):
        inner = typing.get_args(base)[0] if typing.get_args(base) else str
        return inner, False
    return str, False


def _help(f: dataclasses.Field, default) -> str:
    text = f.metadata.get("help", "")
    return f"{text} (default: {default})" if text else f"(default: {default})"


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Every field of `cls` becomes `--field-name` (bools: --flag / --no-flag; tuples: several values)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        opt = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp, is_bool = _field_type(hints[f.name])
        if is_bool:
            parser.add_argument(opt, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata.get("help"))
        elif typing.get_origin(hints[f.name]) in (tuple, list) or isinstance(default, tuple | list):
            parser.add_argument(opt, dest=f.name, type=tp, nargs="+", default=default, metavar=f.name.upper(),
                                help=_help(f, default))
        else:
            parser.add_argument(opt, dest=f.name, type=tp, default=default, help=_help(f, default))


def dataclass_from_args(cls, ns: argparse.Namespace, **extra):
    """The dataclass from parsed options (lists become tuples where the field's default is a tuple)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    for f in dataclasses.fields(cls):
        if isinstance(values.get(f.name), list) and isinstance(f.default, tuple):
            values[f.name] = tuple(values[f.name])
    return cls(**{**values, **extra})


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
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(13, f"cannot write the {what} into this folder", parent)
    return path
