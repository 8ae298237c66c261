"""`python -m nvg.demo`: the structure-control page for a trained generator, served on this machine.

    python -m nvg.demo                               # runs/main/generator on http://127.0.0.1:8765
    python -m nvg.demo --ckpt RUN --port 8000        # another generator run or checkpoint directory

It binds to 127.0.0.1 unless --host says otherwise (the page has no authentication). Ctrl-C stops it.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..cli import ArgumentParser, resolve_device, run

PROG = "python -m nvg.demo"
DEFAULT_CKPT = os.path.join("runs", "main", "generator")


def parse(argv):
    ap = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"generator run or checkpoint directory (default: "
                                                          f"{DEFAULT_CKPT}, the main job's)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    ap.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 = any free port)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    ap.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA ones")
    ap.add_argument("--verbose", action="store_true", help="log every HTTP request")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    args.device = resolve_device(args.device)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if not os.path.exists(args.ckpt):
        hint = ("train one with `python -m nvg.train` (the main job, about 15 min on a CPU)"
                if args.ckpt == DEFAULT_CKPT else "pass --ckpt with a generator run directory")
        raise FileNotFoundError(f"no generator checkpoint at {args.ckpt}: {hint}")
    from ..sample.loading import load_generator
    from .engine import Engine
    from .server import make_server

    model, tok, config = load_generator(args.ckpt, ema=None if args.ema else False, device=args.device)
    try:
        server = make_server(Engine(model, tok, config), args.host, args.port, quiet=not args.verbose)
    except OSError as e:  # port taken, unknown address, no permission
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    print(f"NVG demo on http://{shown}:{port}/ (generator {args.ckpt}; Ctrl-C stops it)", flush=True)
    if not local:
        print(f"warning: bound to {host}, reachable from other machines; the page has no authentication",
              file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    run(main, PROG)
