"""A disk store serves while its index loads: real server processes over real sockets,
started on a store an earlier server filled, with the load held open by the test gate
(SLIPSTREAM_TEST_INDEX_GATE, storage/disk_index.py) after the scan and before its merge.

While the gate file exists the server must answer right (finds, reads, action results,
writes, a corrupt or vanished file dropped), say that its index is loading (the ready
line, /metrics) and evict nothing; once the gate goes, its figures must be exactly the
files on disk, what was written and removed meanwhile included, and a size bound must
hold again."""

from __future__ import annotations

import os
import pathlib
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from slipstream.cache_server.storage.counting import CountingStore
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.disk_index import TEST_GATE_ENV, block_size_of, space_taken
from slipstream.core.digests import BlobId
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.ops.helpers import metrics_url, scrape
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, http_url, output_line, running
from tests.support.store_files import counted_space

LOADING = ("slipstream_store_index_loading", ())
BYTES = ("slipstream_store_bytes", ())
BLOBS = ("slipstream_store_blobs", ())
EVICTIONS = ("slipstream_store_evictions_total", ())


@pytest.fixture
def gate(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """The gate file: while it exists, a server's index load waits before its merge."""
    path = tmp_path / "gate"
    path.touch()
    yield path
    path.unlink(missing_ok=True)


def _rel(d: re_pb2.Digest) -> str:
    return f"cas/{d.hash[:2]}/{d.hash}"


def _result(*outputs: re_pb2.Digest) -> re_pb2.ActionResult:
    return re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path=f"out/{i}", digest=d) for i, d in enumerate(outputs)]
    )


def _read_codes(api: Reapi, *digests: re_pb2.Digest) -> list[tuple[int, bytes]]:
    response = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))
    return [(r.status.code, r.data) for r in response.responses]


def _loaded_samples(
    server: ServerProcess, timeout: float = 30.0
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's /metrics once its index is loaded."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(metrics_url(server))
        if samples[LOADING] == 0:
            return samples
        assert time.monotonic() < deadline, "the index did not load once the gate was gone"
        time.sleep(0.05)


def _assert_loading(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = scrape(metrics_url(server))
    assert samples[LOADING] == 1
    assert BYTES not in samples and BLOBS not in samples  # not known yet: left out
    return samples


def _text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def _serve_gated(root: pathlib.Path, gate: pathlib.Path, *args: str) -> ServerProcess:
    return ServerProcess(
        root, ["--metrics-listen", "127.0.0.1:0", *args], env={TEST_GATE_ENV: str(gate)}
    )


def test_a_server_answers_while_its_index_loads_and_counts_exactly_after(
    tmp_path: pathlib.Path, gate: pathlib.Path
) -> None:
    root = tmp_path / "store"
    with running(ServerProcess(root)) as first, first.channel() as channel:
        api = Reapi(channel)
        kept = api.upload(*(b"kept %d " % i * (100 + 700 * i) for i in range(6)))
        corrupt, vanished, overwritten = api.upload(
            b"to be corrupted " * 300, b"to vanish " * 200, b"named by a result " * 50
        )
        action = digest(b"an action")
        api.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=action, action_result=_result(kept[0]))
        )
    before = counted_space(root)

    with running(_serve_gated(root, gate)) as server, server.channel() as channel:
        assert "index loading" in output_line(server, "storing in the disk store")
        _assert_loading(server)
        api = Reapi(channel)
        absent = digest(b"never stored")
        wrong_size = re_pb2.Digest(hash=kept[1].hash, size_bytes=kept[1].size_bytes + 1)
        assert api.missing(*kept, absent, wrong_size) == [absent, wrong_size]
        assert _read_codes(api, kept[2]) == [(0, b"kept 2 " * 1500)]
        hit = api.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
        assert hit.output_files[0].digest == kept[0]

        # Removals meanwhile: a file found corrupt and one found gone are dropped.
        path = root / _rel(corrupt)
        path.write_bytes(path.read_bytes()[:-4] + b"oops")
        (root / _rel(vanished)).unlink()
        assert [code for code, _ in _read_codes(api, corrupt, vanished)] == [
            grpc.StatusCode.NOT_FOUND.value[0]
        ] * 2
        assert api.missing(corrupt, vanished) == [corrupt, vanished]
        assert not (root / _rel(corrupt)).exists()
        # Writes meanwhile: new blobs, and the action result overwritten with one that
        # takes more blocks (the scan saw the smaller one).
        written = api.upload(*(os.urandom(n) for n in (10, 5000, 70_000)))
        larger = _result(overwritten, *written)
        larger.stdout_raw = b"output " * 2000
        api.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=action, action_result=larger)
        )
        assert api.missing(*written, *kept, overwritten) == []
        samples = _assert_loading(server)  # the gate still holds the load
        assert samples[EVICTIONS] == 0

        gate.unlink()
        samples = _loaded_samples(server)
        entries, taken = counted_space(root)
        assert (samples[BLOBS], samples[BYTES]) == (entries, taken)
        assert entries == before[0] - 2 + len(written)  # the result's record overwritten
        assert api.missing(*kept, *written, overwritten, corrupt, vanished, absent) == [
            corrupt,
            vanished,
            absent,
        ]
        hit = api.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
        assert hit == larger


def test_the_size_bound_holds_once_the_index_is_loaded_and_not_before(
    tmp_path: pathlib.Path, gate: pathlib.Path
) -> None:
    """Ten blobs on disk, a bound of six: nothing is evicted while the index loads (what
    the directory takes is not known yet), though more than the bound is written and used
    meanwhile; once it is loaded, the least recently used go: first every entry not used
    since it was on disk, oldest first, then the oldest of those used during the load."""
    root = tmp_path / "store"
    size = 20_000
    with running(ServerProcess(root)) as first, first.channel() as channel:
        old = Reapi(channel).upload(*(bytes([i]) * size for i in range(10)))
    start = time.time() - 100_000
    for i, d in enumerate(old):  # old[0] the least recently used
        os.utime(root / _rel(d), (start + i, start + i))
    records = [p for p in (root / "records").rglob("*") if p.is_file()]
    block = block_size_of(root)
    bound = 6 * space_taken(size + 16, block) + sum(
        space_taken(p.stat().st_size, block) for p in records
    )

    gated = _serve_gated(root, gate, "--max-size", str(bound))
    with running(gated) as server, server.channel() as channel:
        api = Reapi(channel)
        assert api.missing(old[8], old[9]) == []  # used during the load
        new = api.upload(*(bytes([100 + i]) * size for i in range(5)))
        assert _assert_loading(server)[EVICTIONS] == 0
        assert all((root / _rel(d)).exists() for d in old + new)  # nothing evicted yet
        assert counted_space(root)[1] > bound

        gate.unlink()
        samples = _loaded_samples(server)
        entries, taken = counted_space(root)
        assert (samples[BLOBS], samples[BYTES]) == (entries, taken)
        assert taken <= bound
        evicted = old[:9]
        assert [d for d in old + new if not (root / _rel(d)).exists()] == evicted
        assert samples[EVICTIONS] >= len(evicted)
        assert api.missing(*old, *new) == evicted


def test_workers_serve_while_the_accountant_loads_and_count_exactly_after(
    tmp_path: pathlib.Path, gate: pathlib.Path
) -> None:
    """`serve --workers 2`: the supervisor's index (the accountant) loads while the workers
    serve; what they write and find meanwhile is counted exactly once it is loaded, in
    /metrics and on the workers' pages (which read the figures the accountant shares)."""
    root = tmp_path / "store"
    with running(ServerProcess(root)) as first, first.channel() as channel:
        filled = Reapi(channel).upload(*(b"filled %d " % i * 300 for i in range(20)))
    args = ["--workers", "2", "--http-listen", "127.0.0.1:0"]
    with running(_serve_gated(root, gate, *args)) as server:
        assert "index loading" in output_line(server, "storing in the disk store")
        _assert_loading(server)
        page = f"{http_url(server)}/ui/cache"
        assert "index loading" in _text(page)
        channels = [
            grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(6)
        ]
        try:
            apis = [Reapi(c) for c in channels]
            written = []
            for i, api in enumerate(apis):
                assert api.missing(*filled[i::3], digest(b"absent")) == [digest(b"absent")]
                written += api.upload(os.urandom(100 + 1000 * i))
            for api in apis:
                assert api.missing(*written, *filled) == []
            time.sleep(0.2)  # the workers' reports reach the accountant
            assert _assert_loading(server)[EVICTIONS] == 0

            gate.unlink()
            samples = _loaded_samples(server)
            entries, taken = counted_space(root)
            assert (samples[BLOBS], samples[BYTES]) == (entries, taken)
            figures = (
                f'Stored<b>{taken:,} bytes</b></div><div class="kpi">Entries<b>{entries:,}</b>'
            )
            deadline = time.monotonic() + 10
            while figures not in (text := _text(page)):  # as the accountant published them
                assert time.monotonic() < deadline, text
                time.sleep(0.05)
        finally:
            for c in channels:
                c.close()


def test_finds_leave_the_event_loop_while_the_index_loads(
    tmp_path: pathlib.Path, gate: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finds answered in place (Store.finds_in_memory) would stat files on the event loop
    during the load: they go to worker threads until it is loaded, then come back, through
    the wrappers too. What is to run once it is loaded (the server freezes the index out
    of the garbage collector's walks) runs then, not before."""
    data = b"stored before"
    DiskStore(tmp_path / "s").put_blob(BlobId.of(data), data)
    monkeypatch.setenv(TEST_GATE_ENV, str(gate))
    store = CountingStore(DiskStore(tmp_path / "s"))
    loaded = threading.Event()
    store.start_loading(on_loaded=loaded.set)
    assert not store.finds_in_memory
    assert "index loading" in store.describe()
    assert store.find_missing([BlobId.of(data)]) == []
    assert not loaded.wait(0.2)
    gate.unlink()
    assert loaded.wait(10)
    assert store.finds_in_memory
    assert "1 entries taking" in store.describe()
