"""End-to-end: the real nx (pinned by tests/support/install_js_tools.sh) uses the HTTP endpoint
as its self-hosted remote cache (NX_SELF_HOSTED_REMOTE_CACHE_SERVER and _ACCESS_TOKEN).

A 3-package monorepo (c depends on b, b on a). Runner 1 builds with the remote cache on;
runner 2, a fresh clone with its own empty local cache directory (NX_CACHE_DIRECTORY),
gets every task from the remote cache (`[remote cache]` for each) and its restored
outputs are byte-identical to runner 1's. The same after a server restart; a read-only
token reads and uploads nothing.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.http.helpers import audited_http_server
from tests.ops.helpers import Token
from tests.support.js_tools import NX_JSON, PACKAGES, Nx, clone, outputs, write_monorepo
from tests.support.server_process import ServerProcess, http_url, running

WRITER = Token("ci-nx", "tok-nx-writer-e5f6", ("read", "cas-write", "ac-write"))
READER = Token("dev-nx", "tok-nx-reader-a7b8", ("read",))


@pytest.fixture
def origin(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_monorepo(tmp_path / "origin", {"nx.json": NX_JSON})


def serve(root: pathlib.Path) -> ServerProcess:
    return audited_http_server(root, [WRITER, READER])


def test_a_fresh_runner_gets_every_task_from_the_remote_cache(
    origin: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with running(serve(tmp_path)) as server:
        url = http_url(server)
        first, remote = Nx(clone(origin, tmp_path / "one"), url, WRITER.value).build()
        assert remote == set() and "[local cache]" not in first, first
        built = outputs(tmp_path / "one")

        out, remote = Nx(clone(origin, tmp_path / "two"), url, READER.value).build()
        assert remote == set(PACKAGES), out
        assert outputs(tmp_path / "two") == built

    # A restarted server (same store) still has everything.
    with running(serve(tmp_path)) as server:
        out, remote = Nx(clone(origin, tmp_path / "three"), http_url(server), READER.value).build()
        assert remote == set(PACKAGES), out
        assert outputs(tmp_path / "three") == built


def test_a_read_only_token_reads_and_uploads_nothing(
    origin: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with running(serve(tmp_path)) as server:
        url = http_url(server)
        Nx(clone(origin, tmp_path / "one"), url, WRITER.value).build()
        # Runner 2 changes package c: a and b come from the remote cache, c is built, and
        # its upload is refused (403), which nx reports and goes on.
        two = clone(origin, tmp_path / "two")
        (two / "packages/c/src/index.js").write_text("module.exports.c = () => 'changed';\n")
        out, remote = Nx(two, url, READER.value).build()
        assert remote == {"a", "b"}, out
    puts = [
        json.loads(line)
        for line in (tmp_path / "audit.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "nx_put"
    ]
    assert {(p["caller"], p["outcome"]) for p in puts} == {
        (WRITER.name, "OK"),
        (READER.name, "HTTP 403"),
    }, puts
    assert sum(p["caller"] == WRITER.name for p in puts) == 3
