"""Turborepo remote cache benchmark: Slipstream beside turborepo-remote-cache.

    python -m benchmarks.bench_buildtools [--smoke] [--json results.json] [--storage-dir DIR]

The same Turborepo workload (/v8/artifacts/HASH?slug=bench, a bearer token, an
x-artifact-duration header, as turbo sends it) against `slipstream serve --http-listen`
on the disk store and against turborepo-remote-cache, the community's self-hosted
Turborepo cache (npm; local-disk storage), each storing under --storage-dir
(/dev/shm by default):
  - PUT, then GET, of 1,000 small artifacts (10 KiB) over one keep-alive connection
  - PUT, then GET, of one 100 MiB artifact
  - 8 clients at once, each on its own connection, each PUT then GET of its share of
    small artifacts (artifacts/s over all of them)
in --rounds rounds (3; the servers take turns), and prints each median rate beside the
other's, with their ratio. The reference is installed by
`tests/support/install_js_tools.sh --bench` (this runs it when it is missing, except with
--smoke); where it cannot be had, only Slipstream's rows are measured.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from benchmarks.bench_cache import Row, median_row, report, server_benchmark_parser
from benchmarks.bench_http import KeepAliveConnection
from tests.support.js_tools import INSTALL, tools_dir
from tests.support.server_process import ServerProcess, free_port, http_url

TOKEN = "bench-token"


@dataclass(frozen=True)
class Sizes:
    small_artifacts: int = 1_000
    small_size: int = 10 * 1024
    large_mib: int = 100
    clients: int = 8
    per_client: int = 250


SMOKE = Sizes(small_artifacts=20, large_mib=2, clients=2, per_client=10)


class Client:
    """One keep-alive connection speaking Turborepo's artifact API."""

    def __init__(self, url: str) -> None:
        self.http = KeepAliveConnection(url, {"Authorization": f"Bearer {TOKEN}"}, timeout=300)

    def put(self, hash_: str, body: bytes | Iterator[bytes], length: int) -> None:
        headers = {"Content-Type": "application/octet-stream", "x-artifact-duration": "1200"}
        path = f"/v8/artifacts/{hash_}?slug=bench"
        self.http.put(path, body, length, headers, ok=(200, 202))

    def get(self, hash_: str) -> int:
        return self.http.get(f"/v8/artifacts/{hash_}?slug=bench")

    def close(self) -> None:
        self.http.close()


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_workload(label: str, url: str, sizes: Sizes, round_: int = 0) -> list[Row]:
    """The workload against the Turborepo cache at url; one row per operation. Every
    round uploads artifacts of its own (round_ is in their hashes)."""
    tag = f"{label.encode().hex()[:2]}{round_:02x}"
    rows: list[Row] = []
    kib = sizes.small_size // 1024
    client = Client(url)
    try:
        artifacts = {
            f"{tag}{i:012x}": os.urandom(sizes.small_size) for i in range(sizes.small_artifacts)
        }

        def put_all() -> None:
            for h, a in artifacts.items():
                client.put(h, a, len(a))

        seconds = _timed(put_all)
        rows.append(Row(f"{label} PUT {kib} KiB", len(artifacts), seconds, "artifacts/s"))
        seconds = _timed(lambda: [client.get(h) for h in artifacts])
        rows.append(Row(f"{label} GET {kib} KiB", len(artifacts), seconds, "artifacts/s"))

        block = os.urandom(1 << 20)
        large = f"{tag}ff{sizes.large_mib:010x}"

        def body() -> Iterator[bytes]:
            for _ in range(sizes.large_mib):
                yield block

        seconds = _timed(lambda: client.put(large, body(), sizes.large_mib << 20))
        rows.append(Row(f"{label} PUT {sizes.large_mib} MiB", sizes.large_mib, seconds, "MiB/s"))
        got: list[int] = []
        seconds = _timed(lambda: got.append(client.get(large)))
        rows.append(Row(f"{label} GET {sizes.large_mib} MiB", sizes.large_mib, seconds, "MiB/s"))
        if got != [sizes.large_mib << 20]:
            raise RuntimeError(f"GET {large}: {got} bytes")
    finally:
        client.close()
    rows.append(_concurrent(label, tag, url, sizes))
    return rows


def _concurrent(label: str, tag: str, url: str, sizes: Sizes) -> Row:
    """sizes.clients clients at once, each PUT then GET of its own small artifacts."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(sizes.clients + 1)

    def one(n: int) -> None:
        client = Client(url)
        try:
            mine = {
                f"{tag}c{n:02x}{i:09x}": os.urandom(sizes.small_size)
                for i in range(sizes.per_client)
            }
            barrier.wait()
            for h, a in mine.items():
                client.put(h, a, len(a))
            for h in mine:
                client.get(h)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(sizes.clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{label}: a client failed: {errors[0]!r}")
    count = 2 * sizes.clients * sizes.per_client
    return Row(f"{label} {sizes.clients} clients PUT+GET", count, seconds, "artifacts/s")


def reference_cli(install: bool) -> pathlib.Path | None:
    """turborepo-remote-cache's CLI, installed if need be (and install); else None."""
    cli = tools_dir() / "bench" / "node_modules" / "turborepo-remote-cache" / "dist" / "cli.js"
    if install and not cli.exists() and shutil.which("npm") is not None:
        subprocess.run(["bash", str(INSTALL), "--bench", str(tools_dir())], timeout=600)
    return cli if cli.exists() and shutil.which("node") is not None else None


class Reference:
    """turborepo-remote-cache on loopback, storing on local disk under root."""

    def __init__(self, cli: pathlib.Path, root: pathlib.Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "NODE_ENV": "production",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "TURBO_TOKEN": TOKEN,
            "STORAGE_PROVIDER": "local",
            "STORAGE_PATH": str(root),
            "STORAGE_PATH_USE_TMP_FOLDER": "false",
            "BODY_LIMIT": str(1 << 30),
            "LOG_LEVEL": "silent",
            "ENABLE_STATUS_LOG": "false",
        }
        self.proc = subprocess.Popen(
            ["node", str(cli)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("turborepo-remote-cache did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def print_ratios(rows: list[Row]) -> None:
    by_name = {row.name: row for row in rows}
    print(f"\n{'Slipstream / turborepo-remote-cache':<36} {'ratio':>8}")
    for row in rows:
        if row.name.startswith("slipstream "):
            other = by_name.get("reference " + row.name.removeprefix("slipstream "))
            if other is not None:
                print(f"{row.name.removeprefix('slipstream '):<36} {row.rate / other.rate:>7.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = server_benchmark_parser(__doc__)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds (each server in turn); medians are shown"
    )
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    rounds = 1 if args.smoke else max(1, args.rounds)
    with tempfile.TemporaryDirectory(dir=args.storage_dir) as tmp:
        server = ServerProcess(
            pathlib.Path(tmp) / "store", ["--http-listen", "127.0.0.1:0"]
        ).start()
        reference: Reference | None = None
        try:
            targets = {"slipstream": http_url(server)}
            cli = reference_cli(install=not args.smoke)
            if cli is None:
                print("turborepo-remote-cache is not installed (--smoke installs nothing, and")
                print("elsewhere npm could not get it): not compared")
            else:
                reference = Reference(cli, pathlib.Path(tmp) / "reference")
                targets["reference"] = reference.url
            # The servers take turns, so that a busy moment of the machine hits both.
            measured: dict[str, list[Row]] = {}
            for r in range(rounds):
                order = list(targets.items())
                for label, url in order if r % 2 == 0 else reversed(order):
                    for row in run_workload(label, url, sizes, r):
                        measured.setdefault(row.name, []).append(row)
        finally:
            server.stop()
            if reference is not None:
                reference.stop()
    rows = [median_row(found) for found in measured.values()]
    rows.sort(key=lambda row: not row.name.startswith("slipstream "))
    report(args, sizes, rows)
    print_ratios(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
