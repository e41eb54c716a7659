"""A static file server for a directory on 127.0.0.1 that answers single `Range: bytes=a-b` requests
with 206 (or ignores them, `ranges=False`) and counts the body bytes it sent: the HTTP side of the
ranged-read tests (tests/unit/test_data_ranged.py) and of benchmarks/loader.py's I/O table."""

from __future__ import annotations

import http.server
import os
import threading


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection serves a client thread's range requests
    sent = 0
    ranges = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return self.send_error(404)
        size = os.path.getsize(path)
        rng = self.headers.get("Range")
        with open(path, "rb") as f:
            if rng and type(self).ranges:
                a, b = (int(x) for x in rng.split("=", 1)[1].split("-"))
                f.seek(a)
                body = f.read(min(b, size - 1) - a + 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{size}")
            else:
                body = f.read()
                self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        type(self).sent += len(body)


class RangeServer:
    """`with RangeServer(directory) as (url, handler)`: serves `directory` at `url` in a thread;
    `handler.sent` counts the body bytes, `handler.ranges = False` makes it ignore Range headers."""

    def __init__(self, directory: str):
        self.handler = type("Handler", (RangeHandler,), {"sent": 0, "ranges": True})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: self.handler(*a, directory=directory))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}", self.handler

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
