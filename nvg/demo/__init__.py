"""A local web page for NVG's structure control: `python -m nvg.demo [--ckpt RUN] [--host 127.0.0.1] [--port N]`.

nvg/demo/engine.py runs the requests (one worker, per-request ids and seeds), server.py serves the page
(static/) and its JSON API with the standard library, uploads.py checks uploaded images and drawn masks.
"""
from .engine import Engine
from .server import make_server

__all__ = ["Engine", "make_server"]
