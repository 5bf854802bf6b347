"""End-to-end: the real Pants 2.17.1 uses `slipstream serve` as its remote cache, unchanged.

A tiny project (a `shell_command` with a tree output and an output over the batch
limit, a `pex_binary`, and an `adhoc_tool` that runs that pex) is built with
`pants export-codegen package ::` against the server. Then every bit of Pants'
local state (lmdb store, named caches, workdir, dist) is wiped and it is built
again with `--no-local-cache`: every process that reaches the remote cache must be
a hit, none may run to completion locally, and dist/ must be byte-identical.

Pants runs from its own Python 3.9 venv (made on first use in the suite's cache,
tests/suite_cache.py, reused after); the test is skipped only when no Python
3.9 can be found.
"""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from slipstream.protos import bytestream_pb2, bytestream_pb2_grpc
from tests.e2e.pants_harness import (
    BIG_OUTPUT_BYTES,
    CACHEABLE_PROCESSES,
    PantsInstall,
    PantsProject,
    PantsRun,
    ensure_pants,
    find_python39,
    write_project,
)
from tests.support.server_process import ServerProcess

# A multi-segment instance name, so the resource names Pants sends have one too.
INSTANCE = "e2e/pants"

# Counters that must stay 0 in every run: any of them means cache trouble.
ERROR_COUNTERS = (
    "remote_cache_read_errors",
    "remote_cache_write_errors",
    "remote_cache_request_timeouts",
    "remote_store_missing_digest",
    "remote_store_request_timeouts",
    "local_cache_read_errors",
    "local_cache_write_errors",
)


@pytest.fixture(scope="module")
def pants_install() -> PantsInstall:
    python39 = find_python39()
    if python39 is None:
        reason = "no Python 3.9 (pyenv's or python3.9 on PATH): Pants 2.17.1 needs it"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    install = ensure_pants(python39)
    if install.install_seconds:
        print(f"\ninstalled Pants in {install.venv} in {install.install_seconds:.1f}s")
    else:
        print(f"\nreusing the Pants install in {install.venv}")
    return install


@pytest.fixture
def project(
    tmp_path: pathlib.Path, server: ServerProcess, pants_install: PantsInstall
) -> Iterator[PantsProject]:
    proj = write_project(
        tmp_path, pants_install, remote_store=f"grpc://{server.address}", instance_name=INSTANCE
    )
    if server.proc is not None:
        proj.ignore_pids.add(server.proc.pid)
    try:
        yield proj
    finally:
        lingered = proj.end_leftovers()
        lingered.update(proj.lingered)
        assert not lingered, f"processes outlived the pants runs (ended now): {lingered}"


def _check_clean(run: PantsRun, server: ServerProcess) -> None:
    """No warning or error from Pants (remote cache trouble shows up as these), no
    error counter, and no traceback in the server's output."""
    problems = run.log_lines("WARN", "ERROR")
    assert not problems, "\n".join(problems) + "\n" + run.output
    for name in ERROR_COUNTERS:
        assert run.counter(name) == 0, f"{name} = {run.counter(name)}\n{run.output}"
    server_output = "".join(server.output)
    assert "Traceback" not in server_output, server_output


def _read_over_bytestream(address: str, resource: str) -> bytes:
    with grpc.insecure_channel(address) as channel:
        stub = bytestream_pb2_grpc.ByteStreamStub(channel)
        chunks = stub.Read(bytestream_pb2.ReadRequest(resource_name=resource), timeout=60)
        return b"".join(c.data for c in chunks)


def test_pants_all_remote_hits_after_wiping_local_state(
    project: PantsProject, server: ServerProcess
) -> None:
    n = len(CACHEABLE_PROCESSES)

    # 1. Cold: the server is empty, so every cacheable process misses, runs here,
    #    and its result is written to the server.
    first = project.run()
    print(f"\nfirst run (cold cache): {first.summary()}")
    _check_clean(first, server)
    assert first.counter("remote_cache_requests") == n, first.output
    assert first.counter("remote_cache_requests_cached") == 0, first.output
    assert first.counter("remote_cache_requests_uncached") == n, first.output
    assert first.counter("remote_cache_write_attempts") == n, first.output
    assert first.counter("remote_cache_write_successes") == n, first.output
    assert first.counter("local_execution_requests") >= n, first.output
    assert sorted(first.workunits("Completed")) == sorted(CACHEABLE_PROCESSES), first.output

    first_hashes = project.output_hashes()
    dist = project.dist
    assert (dist / "codegen" / "greeting.txt").read_text() == "hello from pants\n"
    assert (dist / "codegen" / "hello" / "hello_out.txt").read_text() == "hello from a pex\n"
    assert (dist / "codegen" / "tree" / "sub" / "b.txt").read_text() == "".join(
        f"{i}\n" for i in range(1, 101)
    )
    assert first_hashes["codegen/tree/sub/deeper/tool.sh"].endswith(" x")
    assert first_hashes["codegen/tree/sub/empty.txt"].startswith(hashlib.sha256(b"").hexdigest())
    big = (dist / "codegen" / "big.bin").read_bytes()
    assert len(big) == BIG_OUTPUT_BYTES
    assert "hello/hello.pex" in first_hashes

    # The output over the batch limit is on the server, readable over ByteStream.
    resource = f"{INSTANCE}/blobs/{hashlib.sha256(big).hexdigest()}/{len(big)}"
    assert _read_over_bytestream(server.address, resource) == big

    # 2. Warm: no local state at all, no local process cache; everything comes
    #    from the server.
    project.wipe_local_state()
    assert not project.dist.exists()
    second = project.run("--no-local-cache")
    print(f"second run (local state wiped): {second.summary()}")
    _check_clean(second, server)
    assert second.counter("local_cache_requests") == 0, second.output
    assert second.counter("remote_cache_requests") == n, second.output
    assert second.counter("remote_cache_requests_uncached") == 0, second.output
    assert second.counter("remote_cache_requests_cached") == n, second.output
    # Pants starts each process locally too while it looks it up; the lookup must
    # win every time, and the local attempt be cancelled.
    assert second.counter("remote_cache_speculation_local_completed_first") == 0, second.output
    assert second.counter("remote_cache_speculation_remote_completed_first") == n, second.output
    assert second.counter("remote_cache_write_attempts") == 0, second.output
    # (A lookup that answers before the local attempt gets a slot starts no attempt.)
    ran_here = set(second.workunits("Completed")) & set(CACHEABLE_PROCESSES)
    assert not ran_here, second.output
    assert set(second.workunits("Canceled")) <= set(CACHEABLE_PROCESSES), second.output

    assert project.output_hashes() == first_hashes

    # The pex that came from the cache runs.
    out = project.root / "from_cache.txt"
    subprocess.run(
        [project.install.python39, str(dist / "hello" / "hello.pex"), str(out)],
        check=True,
        timeout=120,
        env={"HOME": str(project.root.parent / "home"), "PATH": "/usr/bin:/bin"},
    )
    assert out.read_text() == "hello from a pex\n"
