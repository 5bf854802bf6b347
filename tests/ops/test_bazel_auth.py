"""The real Bazel 4.2.3 with and without a token (--remote_header=Authorization=Bearer ...).

On a server with a token file and anonymous reads: Capabilities tells a caller
without a token update_enabled=false, and Bazel 4.2.3 refuses to build with
--remote_upload_local_results (its default) against it, so nothing is written;
the same build with an ac-write token fills the action cache, and the audit log
says who; a read-only build without a token (--noremote_upload_local_results)
after that gets every action as a remote cache hit. With anonymous access off,
the build without a token is refused with UNAUTHENTICATED. Reuses the workspace
of tests/e2e.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.e2e.bazel_harness import Bazel, BuildResult, Processes
from tests.ops.helpers import Token, metrics_url, scrape, write_token_file
from tests.support.server_process import ServerProcess, running

pytestmark = pytest.mark.bazel

TRUSTED = Token("ci-main", "tok-bazel-main-5d9e1f0a", ("read", "cas-write", "ac-write"))
TARGETS = ("//:greeting", "//:script")  # two small actions: enough to see hits and writes
AC = "build.bazel.remote.execution.v2.ActionCache"


def _flags(bazel: Bazel, server: ServerProcess, token: str | None) -> list[str]:
    flags = bazel.build_flags(remote_cache=f"grpc://{server.address}")
    if token is not None:
        flags.append(f"--remote_header=Authorization=Bearer {token}")
    return flags


def _build(bazel: Bazel, server: ServerProcess, token: str | None, *extra: str) -> BuildResult:
    proc = bazel.run("build", *_flags(bazel, server, token), *extra, "--", *TARGETS)
    return BuildResult(proc.args, proc.stdout, Processes.parse(proc.stdout))


def test_bazel_with_and_without_a_token(bazel: Bazel, tmp_path: pathlib.Path) -> None:
    tokens = write_token_file(tmp_path / "tokens.toml", [TRUSTED])
    audit = tmp_path / "audit.jsonl"
    args = ["--token-file", str(tokens), "--anonymous", "read", "--audit-log", str(audit)]
    args += ["--metrics-listen", "127.0.0.1:0"]
    with running(ServerProcess(tmp_path / "store", args)) as server:
        url = metrics_url(server)

        def ac_updates(code: str) -> float:
            labels = (("code", code), ("method", "UpdateActionResult"), ("service", AC))
            return scrape(url).get(("slipstream_grpc_requests_total", labels), 0.0)

        # No token: the server says this caller may not write, and Bazel (which
        # uploads local results by default) stops before building anything.
        proc = bazel.run("build", *_flags(bazel, server, None), "--", *TARGETS, check=False)
        assert proc.returncode != 0, proc.stdout
        assert "not authorized to write local results to the remote cache" in proc.stdout
        assert ac_updates("OK") == 0
        assert not _lines(audit)

        # With an ac-write token: the results are written, in the audit log by name.
        bazel.clean_expunge()
        trusted = _build(bazel, server, TRUSTED.value)
        assert trusted.processes.executed == len(TARGETS), trusted.output
        assert not trusted.warnings, "\n".join(trusted.warnings)
        assert ac_updates("OK") == len(TARGETS)
        writes = [json.loads(x) for x in _lines(audit)]
        ok = [w for w in writes if w["outcome"] == "OK"]
        assert len(ok) == len(TARGETS)
        assert {(w["event"], w["caller"], w["authenticated"]) for w in ok} == {
            ("ac_write", "ci-main", True)
        }
        assert TRUSTED.value not in audit.read_text()

        # No token again, read-only: anonymous reads get every action from the cache.
        bazel.clean_expunge()
        again = _build(bazel, server, None, "--noremote_upload_local_results")
        assert again.processes.all_remote_hits, again.output
        assert again.processes.remote_hits == len(TARGETS)
        assert ac_updates("OK") == len(TARGETS)


def _lines(path: pathlib.Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_bazel_without_a_token_is_refused_when_anonymous_access_is_off(
    bazel: Bazel, tmp_path: pathlib.Path
) -> None:
    tokens = write_token_file(tmp_path / "tokens.toml", [TRUSTED])
    with running(ServerProcess(tmp_path / "store", ["--token-file", str(tokens)])) as server:
        flags = bazel.build_flags(remote_cache=f"grpc://{server.address}")
        proc = bazel.run("build", *flags, "--", TARGETS[0], check=False)
        assert proc.returncode != 0, proc.stdout
        assert "UNAUTHENTICATED" in proc.stdout, proc.stdout
        assert "this server needs a token" in proc.stdout, proc.stdout
