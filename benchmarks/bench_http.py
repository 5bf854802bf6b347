"""HTTP cache endpoint benchmark: Bazel-style /cas and ccache PUT/GET over keep-alive.

    python -m benchmarks.bench_http [--smoke] [--json results.json] [--storage-dir DIR]

Starts `slipstream serve --http-listen` on the disk store (in a temp dir under
--storage-dir, /dev/shm by default) and measures, each over one HTTP/1.1
keep-alive connection (http.client, as simple a client as there is):
  - PUT and GET of 4 KiB blobs on /cas/SHA256 (blobs/s)
  - PUT and GET of 4 KiB ccache entries on /ccache/KEY (entries/s; a ccache PUT
    is spooled and hashed by the server, then stored as a CAS blob plus a key)
  - PUT and GET of one 64 MiB blob on /cas/SHA256 (MiB/s), streamed both ways
The rows are comparable with bench_cache's gRPC rows (BatchUpdateBlobs, ByteStream).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

from benchmarks.bench_cache import Row, report, server_benchmark_parser
from tests.support.server_process import ServerProcess, http_url

_KEY_ALPHABET = "0123456789abcdefghijklmnopqrstuv"


@dataclass(frozen=True)
class HttpSizes:
    small_blobs: int = 5_000
    small_size: int = 4096
    stream_mib: int = 64


SMOKE = HttpSizes(small_blobs=50, stream_mib=2)


def _ccache_path(i: int) -> str:
    rest = "".join(_KEY_ALPHABET[(i >> (5 * k)) & 31] for k in range(31))
    return f"/ccache/bench/{i % 256:02x}/{rest}"


class KeepAliveConnection:
    """One HTTP/1.1 connection for a benchmark's requests; headers go with every one."""

    def __init__(
        self, url: str, headers: dict[str, str] | None = None, timeout: float = 120
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        assert parsed.hostname and parsed.port
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
        self.headers = dict(headers or {})

    def put(
        self,
        path: str,
        body: bytes | Iterator[bytes],
        length: int,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> None:
        sent = {**self.headers, **(headers or {}), "Content-Length": str(length)}
        self.conn.request("PUT", path, body=body, headers=sent)
        resp = self.conn.getresponse()
        resp.read()
        if resp.status not in ok:
            raise RuntimeError(f"PUT {path}: HTTP {resp.status}")

    def get(self, path: str) -> int:
        """GET path, reading the body 1 MiB at a time; returns its length."""
        self.conn.request("GET", path, headers=self.headers)
        resp = self.conn.getresponse()
        if resp.status != 200:
            resp.read()
            raise RuntimeError(f"GET {path}: HTTP {resp.status}")
        total = 0
        while chunk := resp.read(1 << 20):
            total += len(chunk)
        return total

    def close(self) -> None:
        self.conn.close()


def run_http_workload(url: str, sizes: HttpSizes) -> list[Row]:
    """The HTTP workload against the cache endpoint at url; one row per operation."""
    conn = KeepAliveConnection(url)
    rows: list[Row] = []
    try:
        blobs = [os.urandom(sizes.small_size) for _ in range(sizes.small_blobs)]
        paths = [f"/cas/{hashlib.sha256(b).hexdigest()}" for b in blobs]
        n = len(blobs)

        start = time.perf_counter()
        for path, blob in zip(paths, blobs, strict=True):
            conn.put(path, blob, len(blob))
        rows.append(
            Row(f"HTTP PUT /cas {sizes.small_size // 1024} KiB", n, _since(start), "blobs/s")
        )
        start = time.perf_counter()
        for path in paths:
            conn.get(path)
        rows.append(
            Row(f"HTTP GET /cas {sizes.small_size // 1024} KiB", n, _since(start), "blobs/s")
        )

        entries = [os.urandom(sizes.small_size) for _ in range(n)]
        start = time.perf_counter()
        for i, entry in enumerate(entries):
            conn.put(_ccache_path(i), entry, len(entry))
        rows.append(
            Row(f"HTTP PUT ccache {sizes.small_size // 1024} KiB", n, _since(start), "entries/s")
        )
        start = time.perf_counter()
        for i in range(n):
            conn.get(_ccache_path(i))
        rows.append(
            Row(f"HTTP GET ccache {sizes.small_size // 1024} KiB", n, _since(start), "entries/s")
        )

        block = os.urandom(1 << 20)
        big_hash = hashlib.sha256()
        for _ in range(sizes.stream_mib):
            big_hash.update(block)
        big = f"/cas/{big_hash.hexdigest()}"

        def body() -> Iterator[bytes]:
            for _ in range(sizes.stream_mib):
                yield block

        start = time.perf_counter()
        conn.put(big, body(), sizes.stream_mib << 20)
        rows.append(
            Row(f"HTTP PUT /cas {sizes.stream_mib} MiB", sizes.stream_mib, _since(start), "MiB/s")
        )
        start = time.perf_counter()
        got = conn.get(big)
        rows.append(
            Row(f"HTTP GET /cas {sizes.stream_mib} MiB", sizes.stream_mib, _since(start), "MiB/s")
        )
        if got != sizes.stream_mib << 20:
            raise RuntimeError(f"GET {big}: {got} bytes")
    finally:
        conn.close()
    return rows


def _since(start: float) -> float:
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = server_benchmark_parser(__doc__)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else HttpSizes()
    with tempfile.TemporaryDirectory(dir=args.storage_dir) as tmp:
        server = ServerProcess(
            pathlib.Path(tmp) / "store", ["--http-listen", "127.0.0.1:0"]
        ).start()
        try:
            rows = run_http_workload(http_url(server), sizes)
        finally:
            server.stop()
    report(args, sizes, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
