"""End-to-end: the real Bazel 4.2.3 uses `slipstream serve` as its remote cache, unchanged.

Build a small workspace (genrule, cc_library + cc_binary, an executable output, a
tree artifact and an output over the batch limit) against the server, expunge
Bazel's local state, build again: every action must be a remote cache hit and
every output byte-identical. Restart the server, expunge again: still all hits.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
import subprocess
import time

import grpc
import pytest

from slipstream.protos import bytestream_pb2, bytestream_pb2_grpc
from tests.e2e.bazel_harness import BIG_OUTPUT_BYTES, Bazel, BuildResult
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.bazel

# A multi-segment instance name, so the ByteStream resource names Bazel sends have one too.
INSTANCE = "e2e/bazel"


def _describe(label: str, result: BuildResult, seconds: float) -> str:
    procs = result.processes
    return f"{label}: {seconds:.1f}s, {procs.total} processes {dict(procs.kinds)}"


def _timed_build(
    bazel: Bazel, server: ServerProcess, grpc_log: pathlib.Path
) -> tuple[BuildResult, float]:
    start = time.monotonic()
    result = bazel.build(
        remote_cache=f"grpc://{server.address}", instance_name=INSTANCE, grpc_log=grpc_log
    )
    elapsed = time.monotonic() - start
    # Bazel only warns when an upload or download fails; here that is a failure.
    assert not result.warnings, "\n".join(result.warnings) + "\n" + "".join(server.output)
    return result, elapsed


def _assert_all_hits(result: BuildResult, expected_hits: int, server: ServerProcess) -> None:
    procs = result.processes
    assert procs.executed == 0, (
        f"actions ran locally instead of hitting the cache: {dict(procs.kinds)}\n"
        f"{result.output}\n--- server output ---\n{''.join(server.output)}"
    )
    assert procs.remote_hits == expected_hits, (
        f"expected {expected_hits} remote cache hits, got {dict(procs.kinds)}\n{result.output}"
    )


def _read_over_bytestream(address: str, resource: str) -> bytes:
    with grpc.insecure_channel(address) as channel:
        stub = bytestream_pb2_grpc.ByteStreamStub(channel)
        chunks = stub.Read(bytestream_pb2.ReadRequest(resource_name=resource), timeout=60)
        return b"".join(c.data for c in chunks)


def test_bazel_second_build_is_all_remote_cache_hits(
    bazel: Bazel, server: ServerProcess, tmp_path: pathlib.Path
) -> None:
    timings: list[str] = []

    # 1. Cold: nothing in the cache, so everything runs here and gets uploaded.
    first, secs = _timed_build(bazel, server, tmp_path / "grpc_cold.log")
    timings.append(_describe("cold build", first, secs))
    assert first.processes.remote_hits == 0, first.output
    assert first.processes.executed >= 7, first.output  # genrules, compiles, link, tree
    outputs = bazel.output_hashes()

    # The workspace really produced what the test is about.
    bin_dir = bazel.bin_dir()
    big = (bin_dir / "big.bin").read_bytes()
    assert len(big) == BIG_OUTPUT_BYTES
    assert (bin_dir / "tree_out" / "sub" / "deeper" / "tool.sh").is_file()
    assert outputs["tree_out/sub/deeper/tool.sh"].endswith(" x")
    assert outputs["script.sh"].endswith(" x")
    assert outputs["hello"].endswith(" x")
    assert any(name.endswith(".o") for name in outputs), sorted(outputs)
    # Every file of the tree artifact, in path order: a.txt, sub/b.txt, sub/deeper/tool.sh, ...
    listing = (bin_dir / "tree_listing.txt").read_text()
    assert listing == "alpha\n" + "beta\n" * 100 + "#!/bin/sh\necho tree tool\n", listing
    # Bazel's gRPC log (binary LogEntry protos; the strings are plain): the big output
    # went up with a ByteStream Write under the multi-segment instance name, and the
    # server serves it back whole.
    big_blob = f"/blobs/{hashlib.sha256(big).hexdigest()}/{len(big)}"
    cold_log = (tmp_path / "grpc_cold.log").read_bytes()
    assert b"google.bytestream.ByteStream/Write" in cold_log
    assert re.search(rf"{INSTANCE}/uploads/[0-9a-f-]+{big_blob}".encode(), cold_log)
    assert _read_over_bytestream(server.address, INSTANCE + big_blob) == big

    # 2. Expunge Bazel's output base: every action must now come from the cache.
    bazel.clean_expunge()
    assert not (bazel.workspace / "bazel-bin").exists()
    second, secs = _timed_build(bazel, server, tmp_path / "grpc_warm.log")
    timings.append(_describe("warm build", second, secs))
    _assert_all_hits(second, first.processes.executed, server)
    assert bazel.output_hashes() == outputs
    warm_log = (tmp_path / "grpc_warm.log").read_bytes()
    assert b"google.bytestream.ByteStream/Read" in warm_log
    assert f"{INSTANCE}{big_blob}".encode() in warm_log

    # 3. Restart the server on the same port and storage; expunge again.
    server.restart()
    bazel.clean_expunge()
    third, secs = _timed_build(bazel, server, tmp_path / "grpc_restarted.log")
    timings.append(_describe("after server restart", third, secs))
    _assert_all_hits(third, first.processes.executed, server)
    assert bazel.output_hashes() == outputs

    # The downloaded outputs work, executable bit included.
    bin_dir = bazel.bin_dir()
    for program, expected in (
        ("hello", "the answer is 42\n"),
        ("script.sh", "hello from slipstream\n"),
    ):
        ran = subprocess.run([bin_dir / program], capture_output=True, text=True, check=True)
        assert ran.stdout == expected
    print("\n" + "\n".join(timings))
