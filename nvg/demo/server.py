"""The demo's web server: the standard library's ThreadingHTTPServer, one static page, a small JSON API.

    GET  /                 the page (static/index.html, app.js, style.css)
    GET  /api/info         classes, number of stages, image size, the sampler's official defaults, upload limits
    POST /api/generate     a request (JSON) -> 202 {"job": id}, or 4xx {"error": message}
    GET  /api/job/<id>     {"state": queued|running|done|error, "done", "total", "text", "notes", results...}

Every error is answered as JSON {"error": message} with a 4xx/5xx status; a failing request never stops the server.
"""
from __future__ import annotations

import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .engine import Engine

STATIC = Path(__file__).with_name("static")
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/style.css": ("style.css", "text/css; charset=utf-8")}
MAX_BODY = 16 * 1024 * 1024  # a 10 MB file as base64 plus a drawn mask
DRAIN_LIMIT = 64 * 1024 * 1024  # bodies up to this size are read (and dropped) so the browser sees the answer


class Handler(BaseHTTPRequestHandler):
    server_version = "nvg-demo"
    engine: Engine  # set on the subclass made by make_server
    quiet = True

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def do_GET(self):
        try:
            path = self.path.split("?", 1)[0]
            if path in PAGES:
                name, ctype = PAGES[path]
                self._send(200, (STATIC / name).read_bytes(), ctype)
            elif path == "/api/info":
                self._json(200, self.engine.info())
            elif path.startswith("/api/job/"):
                job = self.engine.status(path[len("/api/job/"):])
                if job is None:
                    self._error(404, "no such request (it may have expired)")
                else:
                    self._json(200, job)
            else:
                self._error(404, f"not found: {path}")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:
            self._error(500, f"internal error: {type(e).__name__}: {e}")

    def do_POST(self):
        try:
            if self.path.split("?", 1)[0] != "/api/generate":
                return self._error(404, f"not found: {self.path}")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._error(411, "the request needs a Content-Length")
            if length > MAX_BODY:
                mb = MAX_BODY // (1024 * 1024)
                if length <= DRAIN_LIMIT:
                    while length > 0:  # read what was sent so that the browser gets the message, not a reset
                        chunk = self.rfile.read(min(length, 1 << 20))
                        if not chunk:
                            break
                        length -= len(chunk)
                else:
                    self.close_connection = True
                return self._error(413, f"the upload is too large (over {mb} MB); files up to 10 MB are accepted")
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except (ValueError, UnicodeDecodeError):
                return self._error(400, "the request is not valid JSON")
            try:
                job = self.engine.submit(body)
            except ValueError as e:
                return self._error(400, str(e))
            except OverflowError as e:
                return self._error(503, str(e))
            self._json(202, {"job": job})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:
            self._error(500, f"internal error: {type(e).__name__}: {e}")


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> ThreadingHTTPServer:
    """A server bound to (host, port) (port 0: any free port; `server.server_address` says which)."""
    handler = type("DemoHandler", (Handler,), {"engine": engine, "quiet": quiet})
    cls = ThreadingHTTPServer
    if ":" in host:  # an IPv6 address such as ::1
        cls = type("DemoServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = cls((host, port), handler)
    server.daemon_threads = True
    return server
