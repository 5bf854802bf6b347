"""Helpers for the HTTP cache endpoint tests: a server with --http-listen, a keep-alive client."""

from __future__ import annotations

import hashlib
import http.client
import json
import pathlib
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tests.ops.helpers import Token, write_token_file
from tests.support.server_process import ServerProcess


def http_server(storage: pathlib.Path | str, extra_args: Sequence[str] = ()) -> ServerProcess:
    """A `slipstream serve` that also serves the HTTP cache, on a free port."""
    return ServerProcess(storage, ["--http-listen", "127.0.0.1:0", *extra_args])


def audited_http_server(root: pathlib.Path, tokens: Sequence[Token]) -> ServerProcess:
    """http_server with its store at root/store, these tokens, and an audit log at
    root/audit.jsonl."""
    token_file = write_token_file(root / "tokens.toml", tokens)
    args = ["--token-file", str(token_file), "--audit-log", str(root / "audit.jsonl")]
    return http_server(root / "store", args)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class HttpClient:
    """One HTTP/1.1 connection (keep-alive) to the server's HTTP cache."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        assert parsed.hostname and parsed.port
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        all_headers = {**self.headers, **(headers or {})}
        if isinstance(body, bytes):
            all_headers.setdefault("Content-Length", str(len(body)))
        self.conn.request(method, path, body=body, headers=all_headers)
        resp = self.conn.getresponse()
        data = resp.read()
        return Reply(resp.status, data, dict(resp.getheaders()))

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def head(self, path: str) -> Reply:
        return self.request("HEAD", path)

    def put(self, path: str, body: bytes | Iterable[bytes], **headers: str) -> Reply:
        return self.request("PUT", path, body, headers)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def served_by(server: ServerProcess, text: str, count: int) -> list[tuple[int, int]]:
    """(pid, HTTP status) of each HTTP call whose access line holds text (its path), once
    count of them are logged or 10 s have passed (the lines come just after the answers).
    The server runs with --log-level INFO --log-format json; with --workers N the pid
    tells which worker answered."""
    deadline = time.monotonic() + 10
    while True:
        found = []
        for line in list(server.output):
            if line.startswith("{") and text in line:
                record = json.loads(line)
                if record.get("logger") == "cache_server.access":
                    # "HTTP PATCH /v2/... 202 1.2ms"
                    found.append((int(record["pid"]), int(record["message"].split()[-2])))
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)
