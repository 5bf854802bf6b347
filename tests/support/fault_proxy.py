"""An HTTP proxy that injects S3 faults between the cache server and moto.

For a chosen share of requests it answers 500 InternalError or 503 SlowDown,
stalls past the client's read timeout, forwards the request but drops the
response (the request took effect, the client never hears), or sends the
response headers and only half of the body. With `down` set, it cuts every
connection at once, like an unreachable S3. `complete_delay` holds every answer to
CompleteMultipartUpload that long, like S3 assembling a large object.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("500", "503", "stall", "drop", "truncate")
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}
)


class FaultProxy:
    def __init__(self, upstream_port: int, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.rate = 0.0
        self.faults: tuple[str, ...] = FAULTS
        self.stall_seconds = 3.0
        self.down = False
        self.only_methods: frozenset[str] | None = None  # e.g. {"PUT"}; None: all
        self.injected: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()  # by HTTP method, faults included
        self.complete_delay = 0.0
        self.completes = 0  # CompleteMultipartUpload requests forwarded
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _choose(self, method: str) -> str | None:
        with self._lock:
            self.requests[method] += 1
            if self.only_methods is not None and method not in self.only_methods:
                return None
            if self._random.random() >= self.rate:
                return None
            fault = self._random.choice(self.faults)
            self.injected[fault] += 1
            return fault

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if self.down:
            _cut(h)
            return
        fault = self._choose(h.command)
        if fault in ("500", "503"):
            code, error = (500, "InternalError") if fault == "500" else (503, "SlowDown")
            payload = f"<Error><Code>{error}</Code><Message>injected</Message></Error>".encode()
            h.send_response(code)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return
        if fault == "stall":
            time.sleep(self.stall_seconds)
            _cut(h)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_HEADERS}
            upstream.request(h.command, h.path, body=body, headers=headers)
            response = upstream.getresponse()
            if h.command == "POST" and "uploadId=" in h.path:
                with self._lock:
                    self.completes += 1
                time.sleep(self.complete_delay)
            if fault == "drop":
                response.read()
                _cut(h)
                return
            h.send_response(response.status, response.reason)
            for k, v in response.getheaders():
                if k.lower() not in _HOP_HEADERS:
                    h.send_header(k, v)
            h.end_headers()
            if h.command == "HEAD":
                return
            declared = int(response.getheader("Content-Length") or 0)
            limit = declared // 2 if fault == "truncate" else None
            sent = 0
            while chunk := response.read(1 << 20):
                if limit is not None and sent + len(chunk) > limit:
                    h.wfile.write(chunk[: limit - sent])
                    h.wfile.flush()
                    _cut(h)
                    return
                h.wfile.write(chunk)
                sent += len(chunk)
        finally:
            upstream.close()


def _cut(h: BaseHTTPRequestHandler) -> None:
    """Close the client's connection abruptly (RST), without a response."""
    h.close_connection = True
    try:
        h.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        h.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
