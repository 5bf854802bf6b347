"""`slipstream serve --workers N`: worker processes sharing the ports and one store,
tested as real server processes over real sockets."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slipstream.cache_server.storage import shared_index
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.disk_index import block_size_of, space_taken
from slipstream.cache_server.storage.shared_index import (
    FIGURES,
    REFRESH_INTERVAL,
    Reporter,
    SharedIndex,
)
from slipstream.cache_server.workers import RESTART_WITHIN
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.ops.helpers import metrics_url, scrape
from tests.support.reapi import Reapi
from tests.support.server_process import (
    ServerProcess,
    free_port,
    http_url,
    output_line,
    running,
    serve_exit,
)

CONNECTIONS = 12


def _channels(server: ServerProcess, n: int = CONNECTIONS) -> list[grpc.Channel]:
    """n channels with a connection each (gRPC shares one between alike channels)."""
    return [
        grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n)
    ]


@contextlib.contextmanager
def _opened(server: ServerProcess, n: int = CONNECTIONS) -> Iterator[list[Reapi]]:
    channels = _channels(server, n)
    try:
        yield [Reapi(channel) for channel in channels]
    finally:
        for channel in channels:
            channel.close()


def _read(api: Reapi, digests: list[re_pb2.Digest]) -> list[bytes]:
    """The blobs, by BatchReadBlobs; a missing one fails the test."""
    response = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))
    assert all(r.status.code == 0 for r in response.responses), response
    return [r.data for r in response.responses]


def _workers_of(pid: int) -> list[int]:
    """The worker processes the supervisor (pid) started (not multiprocessing's own
    resource tracker beside them)."""
    children = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                spawned = b"spawn_main" in (entry / "cmdline").read_bytes()
                if spawned and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


def _answering_pids(server: ServerProcess) -> set[int]:
    """The pids of the processes that logged calls (--log-format json, INFO)."""
    pids = set()
    for line in list(server.output):
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "cache_server.access":
                pids.add(int(record["pid"]))
    return pids


def _files(root: pathlib.Path) -> dict[str, int]:
    """Every blob and record file under a disk store, with its size."""
    return {
        str(path.relative_to(root)): path.stat().st_size
        for kind in ("cas", "records")
        for path in (root / kind).rglob("*")
        if path.is_file()
    }


def _taken(root: pathlib.Path) -> int:
    """The space a disk store's files take, as its size bound counts it."""
    block = block_size_of(root)
    return sum(space_taken(size, block) for size in _files(root).values())


def test_a_blob_written_through_one_connection_is_found_and_read_through_all(
    tmp_path: pathlib.Path,
) -> None:
    args = ["--workers", "2", "--log-level", "INFO", "--log-format", "json"]
    args += ["--http-listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"]
    with running(ServerProcess(tmp_path / "store", args)) as server:
        assert len(_workers_of(server.proc.pid)) == 2  # type: ignore[union-attr]
        assert sum("serving the REAPI v2 cache" in line for line in server.output) == 1
        with _opened(server) as apis:
            blobs = [b"written through one connection %d" % i for i in range(3)]
            digests = apis[0].upload(*blobs)
            for api in apis * 3:
                assert api.missing(*digests) == []
                assert _read(api, digests) == blobs
        url = http_url(server)
        for blob, d in zip(blobs, digests, strict=True):
            for _ in range(6):  # a connection each
                with urllib.request.urlopen(f"{url}/cas/{d.hash}", timeout=10) as resp:
                    assert resp.read() == blob
        assert len(_answering_pids(server)) == 2, "connections were not spread over the workers"
        probe = output_line(server, "health checks").rsplit(" on ", 1)[1].strip()
        for _ in range(4):
            with grpc.insecure_channel(probe, options=[("grpc.use_local_subchannel_pool", 1)]) as c:
                check = health_pb2_grpc.HealthStub(c).Check(health_pb2.HealthCheckRequest())
                assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_workers_share_one_lru_bound(tmp_path: pathlib.Path) -> None:
    """Far more written than the bound, through connections spread over both workers: the
    files left stay within the bound, the blobs read all along stay, and /metrics tells
    the store-wide figures and every worker's calls."""
    bound = 200_000
    size = 20_000
    store = tmp_path / "store"
    args = ["--workers", "2", "--max-size", str(bound), "--metrics-listen", "127.0.0.1:0"]
    with running(ServerProcess(store, args)) as server, _opened(server) as apis:
        hot = [b"hot %d " % i * (size // 6) for i in range(2)]
        hot_digests = apis[0].upload(*hot)
        written = sum(map(len, hot))
        writes = 1
        for round_ in range(6):
            for i in range(5):  # half the bound a round
                api = apis[(round_ * 5 + i) % len(apis)]
                api.upload(os.urandom(size))
                written += size
                writes += 1
            time.sleep(REFRESH_INTERVAL + 0.1)  # a worker reports an entry once a second
            for api in apis[round_ % 3 :: 3]:
                assert _read(api, hot_digests) == hot
            time.sleep(0.1)  # the reads' reports reach the accountant
        assert written > 3 * bound
        deadline = time.monotonic() + 10
        while _taken(store) > bound and time.monotonic() < deadline:
            time.sleep(0.05)
        files = _files(store)
        block = block_size_of(store)
        taken = sum(space_taken(size, block) for size in files.values())  # what the bound counts
        assert sum(files.values()) <= taken <= bound
        for d in hot_digests:
            assert f"cas/{d.hash[:2]}/{d.hash}" in files, "a blob read all along was evicted"
        for api in apis:
            assert api.missing(*hot_digests) == []

        samples = scrape(metrics_url(server))
        assert samples[("slipstream_store_bytes", ())] == taken
        assert samples[("slipstream_store_blobs", ())] == len(files)
        assert samples[("slipstream_store_evictions_total", ())] >= writes - len(files)
        update = (
            ("code", "OK"),
            ("method", "BatchUpdateBlobs"),
            ("service", "build.bazel.remote.execution.v2.ContentAddressableStorage"),
        )
        assert samples[("slipstream_grpc_requests_total", update)] == writes
        # The workers' store call counts come once a second.
        put_blobs = ("slipstream_store_operations_total", (("operation", "put_blobs"),))
        deadline = time.monotonic() + 5
        while samples.get(put_blobs) != writes and time.monotonic() < deadline:
            time.sleep(0.2)
            samples = scrape(metrics_url(server))
        assert samples.get(put_blobs) == writes


def test_sigterm_stops_the_supervisor_and_every_worker(tmp_path: pathlib.Path) -> None:
    server = ServerProcess(tmp_path / "store", ["--workers", "2"]).start()
    try:
        assert server.proc is not None
        workers = _workers_of(server.proc.pid)
        assert len(workers) == 2
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 10
        assert not [pid for pid in workers if pathlib.Path(f"/proc/{pid}").exists()]
        assert "slipstream: shutting down\n" in server.output
    finally:
        server.kill()


def test_a_worker_dying_soon_after_start_stops_the_server(tmp_path: pathlib.Path) -> None:
    """The choice for a worker that dies within RESTART_WITHIN seconds of its start
    (most likely it cannot serve at all): the others stop and the supervisor exits 1."""
    server = ServerProcess(tmp_path / "store", ["--workers", "2"]).start()
    try:
        assert server.proc is not None
        first, second = _workers_of(server.proc.pid)
        os.kill(first, signal.SIGKILL)
        assert server.proc.wait(20) == 1
        assert not pathlib.Path(f"/proc/{second}").exists()
        assert any("exited with code -9" in line for line in server.output)
    finally:
        server.kill()


def test_a_foreign_server_on_the_workers_port_is_refused(tmp_path: pathlib.Path) -> None:
    with running(ServerProcess(tmp_path / "store", ["--workers", "2"])) as server:
        for workers in ("1", "2"):
            result = serve_exit(
                "--listen",
                server.address,
                "--storage",
                str(tmp_path / "other"),
                "--workers",
                workers,
            )
            assert result.returncode == 2, result
            assert result.stderr.splitlines() == [
                f"slipstream serve: error: cannot listen on {server.address}: "
                "the port is in use or the host is not this machine's"
            ]


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", ""])
def test_bad_workers_values_exit_2_with_one_line(tmp_path: pathlib.Path, value: str) -> None:
    result = serve_exit(
        "--listen", f"127.0.0.1:{free_port()}", "--storage", str(tmp_path), "--workers", value
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "--workers" in result.stderr and "Traceback" not in result.stderr


def test_memory_storage_with_workers_exits_2_with_one_line() -> None:
    result = serve_exit("--listen", "127.0.0.1:0", "--storage", "memory://", "--workers", "2")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "slipstream serve: error: --storage memory:// cannot be shared by --workers 2 "
        "processes (each would have its own memory): give a directory, or run one worker"
    ]


def test_one_worker_keeps_the_single_process_server(tmp_path: pathlib.Path) -> None:
    """--workers 1 (the default) is the server as it was: one process, its own index."""
    with running(ServerProcess(tmp_path / "store", ["--workers", "1"])) as server:
        assert server.proc is not None
        assert _workers_of(server.proc.pid) == []
        api = Reapi(server.channel())
        d = api.upload(b"one process")
        assert api.missing(*d) == []
        assert not any("worker processes" in line for line in server.output)


def test_every_worker_appends_whole_lines_to_the_one_audit_log(tmp_path: pathlib.Path) -> None:
    audit = tmp_path / "audit.jsonl"
    args = ["--workers", "2", "--audit-log", str(audit), "--log-level", "INFO"]
    args += ["--log-format", "json"]
    with running(ServerProcess(tmp_path / "store", args)) as server, _opened(server) as apis:
        result = re_pb2.ActionResult(exit_code=0)
        for i in range(40):
            action = re_pb2.Digest(hash=f"{i:064x}", size_bytes=i + 1)
            apis[i % len(apis)].ac.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result)
            )
        assert len(_answering_pids(server)) == 2
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted(r["action_digest"] for r in records) == sorted(
        f"{i:064x}/{i + 1}" for i in range(40)
    )


def test_a_worker_that_dies_later_is_replaced(tmp_path: pathlib.Path) -> None:
    with running(ServerProcess(tmp_path / "store", ["--workers", "2"])) as server:
        assert server.proc is not None
        first, second = _workers_of(server.proc.pid)
        time.sleep(RESTART_WITHIN + 0.5)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = _workers_of(server.proc.pid)
            if len(workers) == 2 and first not in workers:
                break
            time.sleep(0.1)
        assert second in workers and first not in workers and len(workers) == 2
        assert any(
            "exited with code -9" in line and "starting another" in line for line in server.output
        )
        with _opened(server, 8) as apis:  # both serve: the new one too
            d = apis[0].upload(b"after a restart")
            for api in apis:
                assert api.missing(*d) == []
        assert server.proc.poll() is None


def test_workers_come_from_the_environment_and_the_config_file(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("workers = 2\n")
    for server in (
        ServerProcess(tmp_path / "a", env={"SLIPSTREAM_WORKERS": "2"}),
        ServerProcess(tmp_path / "b", ["--config", str(config)]),
    ):
        with running(server):
            assert server.proc is not None
            assert len(_workers_of(server.proc.pid)) == 2


def test_the_pages_add_up_every_workers_lookups(tmp_path: pathlib.Path) -> None:
    """Each worker saves what it counted (at the latest when it stops); the pages add up
    every process's record, so the lookups of both workers show, also after a restart."""
    args = ["--workers", "2", "--log-level", "INFO", "--log-format", "json"]
    args += ["--http-listen", "127.0.0.1:0"]
    miss = "/ccache/3b/" + "d" * 31
    with running(ServerProcess(tmp_path / "store", args)) as server:
        url = http_url(server)
        for _ in range(CONNECTIONS):  # a connection each
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{url}{miss}", timeout=10)
            assert refused.value.code == 404
        assert len(_answering_pids(server)) == 2, "connections were not spread over the workers"
    args = ["--http-listen", "127.0.0.1:0"]
    with running(ServerProcess(tmp_path / "store", args)) as server:
        page = urllib.request.urlopen(f"{http_url(server)}/ui/cache", timeout=10).read().decode()
    row = page.split('<tr data-kind="ccache">')[1].split("</tr>")[0]
    cells = [cell.split("<")[0] for cell in row.split('<td class="n">')[1:]]
    assert cells[:2] == ["0", str(CONNECTIONS)], row  # hits, misses


def test_a_workers_index_is_used_by_many_threads_at_once(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store threads and the event loop admit, find and touch entries at once, past
    the bound of entries a worker remembers: none of them fails (a find answered
    INTERNAL, "dictionary changed size during iteration", under the fleet's load)."""
    monkeypatch.setattr(shared_index, "_RECENT_MAX", 2_000)  # passed often, not once a minute
    root = tmp_path / "store"
    DiskStore(root)
    worker, supervisor = socket.socketpair()

    def drain() -> None:
        while supervisor.recv(1 << 20):
            pass

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    index = SharedIndex(root, Reporter(worker, lambda: None), [0] * FIGURES)
    failures: list[BaseException] = []

    def admit(thread: int) -> None:
        try:
            for i in range(20_000):
                index.admit(f"cas/{thread:02x}/{i}", 4096)
                index.touched([f"cas/ff/{thread}-{i}"])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=admit, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    index.close()
    worker.close()  # the drain reads to the end, then the socket is closed
    drainer.join(timeout=10)
    supervisor.close()
    assert failures == []
