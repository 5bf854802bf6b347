"""End-to-end: the real turbo (pinned by tests/support/install_js_tools.sh) uses the HTTP
endpoint as its remote cache (TURBO_API, TURBO_TOKEN, TURBO_TEAM).

A 3-package monorepo (c depends on b, b on a). Runner 1 builds with remote caching on;
runner 2, a fresh clone with its own empty local cache directory (TURBO_CACHE_DIR), gets
every task from the remote cache (`FULL TURBO`) and its restored outputs are
byte-identical to runner 1's. The same after a server restart; another team gets
nothing; signed artifacts verify; a read-only token reads and uploads nothing.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.http.helpers import audited_http_server
from tests.ops.helpers import Token
from tests.support.js_tools import TURBO_JSON, Turbo, clone, git, outputs, write_monorepo
from tests.support.server_process import ServerProcess, http_url, running

WRITER = Token("ci-turbo", "tok-turbo-writer-a1b2", ("read", "cas-write", "ac-write"))
READER = Token("dev-turbo", "tok-turbo-reader-c3d4", ("read",))


@pytest.fixture
def origin(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_monorepo(tmp_path / "origin", {"turbo.json": TURBO_JSON})


def serve(root: pathlib.Path) -> ServerProcess:
    return audited_http_server(root, [WRITER, READER])


def test_a_fresh_runner_gets_every_task_from_the_remote_cache(
    origin: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with running(serve(tmp_path)) as server:
        url = http_url(server)
        first, cached = Turbo(
            clone(origin, tmp_path / "one"), url, WRITER.value, "team_web"
        ).build()
        assert cached == 0, first
        built = outputs(tmp_path / "one")

        out, cached = Turbo(clone(origin, tmp_path / "two"), url, READER.value, "team_web").build()
        assert cached == 3 and ">>> FULL TURBO" in out, out
        assert outputs(tmp_path / "two") == built

        # Another team's namespace holds none of it.
        out, cached = Turbo(clone(origin, tmp_path / "other"), url, WRITER.value, "web2").build()
        assert cached == 0, out

    # A restarted server (same store) still has everything.
    with running(serve(tmp_path)) as server:
        turbo = Turbo(clone(origin, tmp_path / "three"), http_url(server), READER.value, "team_web")
        out, cached = turbo.build()
        assert cached == 3 and ">>> FULL TURBO" in out, out
        assert outputs(tmp_path / "three") == built


def test_signed_artifacts_are_verified_by_turbo(
    origin: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    signed = {**TURBO_JSON, "remoteCache": {"signature": True}}
    (origin / "turbo.json").write_text(json.dumps(signed))
    git(origin, "commit", "-qam", "sign the artifacts")
    key = {"TURBO_REMOTE_CACHE_SIGNATURE_KEY": "a-shared-signing-secret"}
    with running(serve(tmp_path)) as server:
        url = http_url(server)
        _, cached = Turbo(clone(origin, tmp_path / "one"), url, WRITER.value, "signed").build(**key)
        assert cached == 0
        # The tag came back with each artifact, so turbo verified and used them.
        turbo = Turbo(clone(origin, tmp_path / "two"), url, READER.value, "signed")
        out, cached = turbo.build(**key)
        assert cached == 3 and ">>> FULL TURBO" in out, out
        assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
        # With another key, no artifact verifies: every task runs.
        other = {"TURBO_REMOTE_CACHE_SIGNATURE_KEY": "some-other-secret"}
        turbo = Turbo(clone(origin, tmp_path / "three"), url, READER.value, "signed")
        out, cached = turbo.build(**other)
        assert cached == 0, out


def test_a_read_only_token_reads_and_uploads_nothing(
    origin: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with running(serve(tmp_path)) as server:
        url = http_url(server)
        Turbo(clone(origin, tmp_path / "one"), url, WRITER.value, "team_web").build()
        # Runner 2 changes package c: a and b come from the cache, c is built, and its
        # upload is refused (403), which turbo takes in its stride.
        two = clone(origin, tmp_path / "two")
        (two / "packages/c/src/index.js").write_text("module.exports.c = () => 'changed';\n")
        out, cached = Turbo(two, url, READER.value, "team_web").build()
        assert cached == 2, out
        # turbo reads the 403 (Vercel's JSON error form) as "don't upload", and says so.
        assert "skipping uploads for this run" in out and "unable to parse" not in out, out
    puts = [
        json.loads(line)
        for line in (tmp_path / "audit.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "turborepo_put"
    ]
    assert {(p["caller"], p["outcome"]) for p in puts} == {
        (WRITER.name, "OK"),
        (READER.name, "HTTP 403"),
    }, puts
    assert sum(p["caller"] == WRITER.name for p in puts) == 3
