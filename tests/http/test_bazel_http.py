"""End-to-end: the real Bazel 4.2.3 uses the HTTP endpoint as its remote cache, unchanged.

`--remote_cache=http://HOST:PORT/INSTANCE` on the workspace of tests/e2e (genrule,
cc_library + cc_binary, an executable output, a tree artifact, a 6 MiB output):
a cold build fills the cache over HTTP, `clean --expunge`, and the next build
over HTTP is all remote cache hits with byte-identical outputs. Then, expunged
again, the same build over gRPC with the same instance name is all hits too:
Bazel's HTTP and gRPC caches share one store.
"""

from __future__ import annotations

import pathlib

import pytest

from tests.e2e.bazel_harness import Bazel, BuildResult
from tests.http.helpers import http_server
from tests.support.server_process import ServerProcess, http_url, running

pytestmark = pytest.mark.bazel

INSTANCE = "e2e/http"


def _build(
    bazel: Bazel, server: ServerProcess, remote_cache: str, instance: str = ""
) -> BuildResult:
    result = bazel.build(remote_cache=remote_cache, instance_name=instance)
    # Bazel only warns when an upload or download fails; here that is a failure.
    assert not result.warnings, "\n".join(result.warnings) + "\n" + "".join(server.output)
    return result


def _assert_all_hits(result: BuildResult, expected: int) -> None:
    procs = result.processes
    assert procs.executed == 0 and procs.remote_hits == expected, (
        f"expected {expected} remote cache hits, got {dict(procs.kinds)}\n{result.output}"
    )


def test_bazel_over_http_then_grpc_is_all_remote_hits(bazel: Bazel, tmp_path: pathlib.Path) -> None:
    with running(http_server(tmp_path / "store", ["--log-level", "INFO"])) as server:
        http_cache = f"{http_url(server)}/{INSTANCE}"
        cold = _build(bazel, server, http_cache)
        assert cold.processes.remote_hits == 0, cold.output
        assert cold.processes.executed >= 7, cold.output
        outputs = bazel.output_hashes()
        # Bazel really spoke HTTP to the instance's /cas and /ac paths (the access log).
        log = "".join(server.output)
        assert f"HTTP PUT /{INSTANCE}/ac/" in log and f"HTTP PUT /{INSTANCE}/cas/" in log

        bazel.clean_expunge()
        warm = _build(bazel, server, http_cache)
        _assert_all_hits(warm, cold.processes.executed)
        assert bazel.output_hashes() == outputs

        bazel.clean_expunge()
        over_grpc = _build(bazel, server, f"grpc://{server.address}", instance=INSTANCE)
        _assert_all_hits(over_grpc, cold.processes.executed)
        assert bazel.output_hashes() == outputs
    for label, result in (("cold, http", cold), ("warm, http", warm), ("warm, grpc", over_grpc)):
        print(f"{label}: {result.processes.total} processes {dict(result.processes.kinds)}")
