"""The disk store: restart, LRU bound, corruption, crash safety (through the real server)."""

from __future__ import annotations

import gc
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slipstream.cache_server.storage.base import RecordKeyError
from slipstream.cache_server.storage.disk import (
    RAM_FILESYSTEMS,
    DiskStore,
    filesystem_of,
    filesystem_type,
)
from slipstream.cache_server.storage.disk_index import LocalIndex
from slipstream.core.digests import EMPTY_BLOB, BlobId
from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.support.reapi import Reapi, digest, rpc_error
from tests.support.server_process import ServerProcess, serve_exit
from tests.support.store_files import counted_space


def _blob_path(storage: pathlib.Path, d: re_pb2.Digest) -> pathlib.Path:
    return storage / "cas" / d.hash[:2] / d.hash


def test_restart_keeps_blobs_and_action_results(tmp_path: pathlib.Path) -> None:
    server = ServerProcess(tmp_path / "s").start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            (d,) = api.upload(b"survives a restart")
            big = os.urandom(1_500_000)
            api.write(big)
            result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="o", digest=d)])
            api.ac.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(action_digest=digest(b"act"), action_result=result)
            )
        assert server.stop() == 0
        assert any("shutting down" in line for line in server.output)
        server.start()
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            assert api.missing(d, digest(big)) == []
            assert api.read(digest(big)) == big
            got = api.ac.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=digest(b"act"))
            )
            assert got == result
    finally:
        server.kill()


def test_size_bound_evicts_least_recently_used(tmp_path: pathlib.Path) -> None:
    server = ServerProcess(tmp_path / "s", ["--max-size", "100K"]).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            a, b, c = (bytes([i]) * 30_000 for i in (1, 2, 3))
            da, db, dc = api.upload(a, b, c)
            assert api.missing(da, db, dc) == []
            api.missing(da)  # finding a blob refreshes it: b is now the oldest
            (dd,) = api.upload(b"\4" * 30_000)
            assert api.missing(da, db, dc, dd) == [db]
            assert not _blob_path(tmp_path / "s", db).exists()
            # A blob bigger than the whole bound is refused, not stored.
            huge = b"\5" * 200_000
            err = rpc_error(lambda: api.write(huge))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop()


def _space_on_disk(root: pathlib.Path) -> int:
    """What du counts: the blocks of every file and directory under root."""
    total = root.stat().st_blocks * 512
    for path in root.rglob("*"):
        total += path.lstat().st_blocks * 512
    return total


def test_size_bound_counts_the_space_small_blobs_take(tmp_path: pathlib.Path) -> None:
    """A 20-byte blob takes a whole filesystem block and a directory entry: 2,000 of
    them under a 1 MiB bound keep the store's space on disk within the bound (above
    what the empty layout took, and the 256 shard directories' first blocks), where
    counting bytes written let them take ~8 MB."""
    storage = tmp_path / "s"
    server = ServerProcess(storage, ["--max-size", "1M", "--no-fsync"]).start()
    try:
        layout = _space_on_disk(storage)
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            blobs = [b"small blob %09d" % i + b"." * 4 for i in range(2_000)]
            digests = []
            for start in range(0, len(blobs), 200):
                digests += api.upload(*blobs[start : start + 200])
            kept = len(digests) - len(api.missing(*digests))
        shards = 256 * os.statvfs(storage).f_frsize
        taken = _space_on_disk(storage) - layout - shards
        assert taken <= 1 << 20, f"{taken:,} bytes on disk for a 1 MiB bound"
        assert 200 <= kept <= 260  # 1 MiB / (4 KiB + 112): the bound holds what fits
    finally:
        server.stop()


def test_eviction_makes_dependent_action_result_not_found(tmp_path: pathlib.Path) -> None:
    server = ServerProcess(tmp_path / "s", ["--max-size", "100K"]).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            (d_out,) = api.upload(b"\1" * 40_000)
            result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="o", digest=d_out)])
            action = digest(b"evict me")
            api.ac.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result)
            )
            api.upload(b"\2" * 50_000)
            api.upload(b"\3" * 20_000)  # pushes the output (the oldest entry) out
            assert api.missing(d_out) == [d_out]
            err = rpc_error(
                lambda: api.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
            )
            assert err.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


@pytest.fixture(params=["disk", "tmpfs"])
def store_root(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> pathlib.Path:
    """Where a test's store lives: the test's own directory, and one on tmpfs, where
    the store makes its calls in place on the event loop."""
    if request.param == "disk":
        return tmp_path
    root: pathlib.Path = request.getfixturevalue("tmpfs_path")
    return root


def test_corrupt_blob_on_disk_is_never_served(store_root: pathlib.Path) -> None:
    server = ServerProcess(store_root / "s").start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            small, big = b"small blob content", os.urandom(300_000)
            d_small, d_big = api.upload(small, big)
            for d in (d_small, d_big):
                path = _blob_path(store_root / "s", d)
                raw = bytearray(path.read_bytes())
                raw[-1] ^= 0xFF  # flip bits in the payload
                path.write_bytes(bytes(raw))
            resp = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[d_small]))
            assert resp.responses[0].status.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert resp.responses[0].data == b""
            err = rpc_error(lambda: api.read(d_big))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            # Dropped from the index too, so clients upload it again.
            assert api.missing(d_small, d_big) == [d_small, d_big]
            api.upload(small)
            assert api.read(d_small) == small
    finally:
        server.stop()


def test_corrupt_large_blob_fails_its_read_before_the_end(store_root: pathlib.Path) -> None:
    """Large blobs are checked as they stream: the read fails before its last chunk."""
    server = ServerProcess(store_root / "s").start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            data = os.urandom(3 * 1024 * 1024 + 5)  # several read chunks
            (d,) = api.upload(data)
            path = _blob_path(store_root / "s", d)
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            path.write_bytes(bytes(raw))
            received = 0
            request = bs_pb2.ReadRequest(resource_name=f"blobs/{d.hash}/{d.size_bytes}")
            with pytest.raises(grpc.RpcError) as err:
                for response in api.bytestream.Read(request):
                    received += len(response.data)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "checksum" in (err.value.details() or "")
            assert received < len(data)
            # Dropped: the next read is a plain miss and clients upload it again.
            assert api.missing(d) == [d]
            assert rpc_error(lambda: api.read(d)).code() == grpc.StatusCode.NOT_FOUND
            api.upload(data)
            assert api.read(d) == data
            # Reads from an offset are checked over the whole blob too.
            offset = 2 * 1024 * 1024 + 1
            assert api.read(d, offset=offset) == data[offset:]
    finally:
        server.stop()


def test_kill_mid_write_leaves_no_readable_partial_blob(tmp_path: pathlib.Path) -> None:
    storage = tmp_path / "s"
    server = ServerProcess(storage).start()
    data = os.urandom(4 * 1024 * 1024)
    d = digest(data)
    name = f"uploads/k1/blobs/{d.hash}/{d.size_bytes}"
    try:
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            step = 512 * 1024
            reqs = [
                bs_pb2.WriteRequest(
                    resource_name=name if i == 0 else "", write_offset=i, data=data[i : i + step]
                )
                for i in range(0, len(data) // 2, step)
            ]

            def stalled():
                yield from reqs
                time.sleep(1.0)  # hold the stream open with half the blob sent
                server.kill()
                yield bs_pb2.WriteRequest(write_offset=len(data) // 2, data=b"")

            rpc_error(lambda: api.bytestream.Write(stalled()))
        assert not _blob_path(storage, d).exists()
        server.start()
        assert not any((storage / "tmp").iterdir()), "leftover temp files are cleared at start"
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            assert api.missing(d) == [d]
            assert rpc_error(lambda: api.read(d)).code() == grpc.StatusCode.NOT_FOUND
            api.write(data, upload_id="k2")  # the client's retry succeeds
            assert api.read(d) == data
    finally:
        server.kill()


def test_store_records_api(tmp_path: pathlib.Path) -> None:
    store = DiskStore(tmp_path)
    assert store.put_record("layers", "deps/linux/1", b"one", overwrite=False)
    assert not store.put_record("layers", "deps/linux/1", b"two", overwrite=False)
    assert store.get_record("layers", "deps/linux/1") == b"one"
    store.put_record("layers", "deps/linux/2", b"two")
    store.put_record("layers", "deps/mac/1", b"three")
    store.put_record("layers", "../../escape", b"safe")
    assert [r.key for r in store.list_records("layers", "deps/linux/")] == [
        "deps/linux/1",
        "deps/linux/2",
    ]
    assert store.get_record("layers", "../../escape") == b"safe"
    assert not (tmp_path.parent / "escape").exists()
    store.delete_record("layers", "deps/mac/1")
    assert store.get_record("layers", "deps/mac/1") is None
    with pytest.raises(RecordKeyError):
        store.put_record("layers", "", b"x")
    with pytest.raises(RecordKeyError):
        store.put_record("Bad NS", "k", b"x")
    with pytest.raises(RecordKeyError):
        store.put_record("layers", "x" * 1000, b"x")


def test_store_writer_refuses_mismatch(tmp_path: pathlib.Path) -> None:
    from slipstream.core.digests import DigestError

    store = DiskStore(tmp_path)
    blob = BlobId.of(b"abc")
    writer = store.open_writer(blob)
    writer.write(b"abd")
    with pytest.raises(DigestError):
        writer.commit()
    assert store.get_blob(blob) is None
    assert not any((tmp_path / "tmp").iterdir())


def test_serve_cli_errors_and_sigterm(tmp_path: pathlib.Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return serve_exit("--storage", str(tmp_path), *args)

    for args in (["--max-size", "lots"], ["--listen", "nonsense"], ["--listen", "999.1.1.1:1"]):
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    server = ServerProcess(tmp_path / "s").start()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    text = "".join(server.output)
    assert "serving the REAPI v2 cache on 127.0.0.1:" in text
    assert f"disk store at {tmp_path / 's'}" in text


def test_sigterm_right_after_the_ready_line_stops_cleanly(tmp_path: pathlib.Path) -> None:
    """A script may stop the server the moment it says it is serving: the signal must
    reach the shutdown handler, not the default action that kills the process."""
    serve = [sys.executable, "-m", "slipstream.cli", "serve", "--listen", "127.0.0.1:0"]
    for attempt in range(3):
        proc = subprocess.Popen(
            [*serve, "--storage", str(tmp_path / str(attempt))],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if "serving the REAPI v2 cache" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stdout.read()
        assert proc.wait(20) == 0, rest
        assert "shutting down" in rest


def test_second_process_on_the_same_dir_keeps_writes_in_flight(tmp_path: pathlib.Path) -> None:
    store = DiskStore(tmp_path)
    data = os.urandom(100_000)
    blob = BlobId.of(data)
    writer = store.open_writer(blob)
    writer.write(data[:50_000])
    # A CLI reading timings opens the same directory while the write is open.
    reader = DiskStore(tmp_path)
    assert reader.put_record("timings", "suite/1", b"{}")
    writer.write(data[50_000:])
    writer.commit()
    assert store.get_blob(blob) == data
    assert reader.get_blob(blob) == data
    # Leftovers of a process that no longer runs are cleared.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / "tmp" / f"{dead.pid}-abandoned"
    leftover.write_bytes(b"partial")
    DiskStore(tmp_path)
    assert not leftover.exists()


def test_index_costs_the_garbage_collector_nothing(tmp_path: pathlib.Path) -> None:
    """The LRU index holds one entry per file; none of them stays tracked by CPython's
    cycle collector, whether scanned at start-up, stored, or refreshed by a find."""
    store = DiskStore(tmp_path / "store")
    scanned = [BlobId.of(b"scanned %d" % i) for i in range(3)]
    an_hour_ago = time.time() - 3600  # so that a find refreshes the entry
    for i, blob in enumerate(scanned):
        store.put_blob(blob, b"scanned %d" % i)
        os.utime(tmp_path / "store" / DiskStore._blob_rel(blob), (an_hour_ago, an_hour_ago))
    store = DiskStore(tmp_path / "store")  # a new process's index, from the scan
    assert store.find_missing(scanned) == []
    stored = BlobId.of(b"stored later")
    store.put_blob(stored, b"stored later")
    rel = DiskStore._blob_rel(scanned[0])
    index = store.index
    assert isinstance(index, LocalIndex)
    assert index._lru[rel][1] > an_hour_ago + 60  # refreshed by the find above
    gc.collect()
    entries = list(index._lru.values())
    assert len(entries) == 4
    assert not any(gc.is_tracked(entry) for entry in entries)


def test_get_blobs_reads_a_batch_in_order_and_refreshes_what_it_found(
    tmp_path: pathlib.Path,
) -> None:
    store = DiskStore(tmp_path / "s", max_size=110_000)
    blobs = {}
    for i in range(3):
        data = bytes([i]) * 30_000
        blob = BlobId.of(data)
        store.put_blob(blob, data)
        blobs[blob] = data
    first, second, third = blobs
    corrupt = BlobId.of(b"corrupt on disk")
    store.put_blob(corrupt, b"corrupt on disk")
    path = tmp_path / "s" / "cas" / corrupt.hash[:2] / corrupt.hash
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    absent = BlobId.of(b"never stored")
    asked = [third, absent, EMPTY_BLOB, corrupt, first, first]
    got = store.get_blobs(asked)
    assert [None if d is None else bytes(d) for d in got] == [  # type: ignore[arg-type]
        blobs[third],
        None,
        b"",
        None,  # and dropped
        blobs[first],
        blobs[first],
    ]
    assert store.find_missing([corrupt]) == [corrupt]
    # first and third were refreshed: the next blob evicts second, the oldest.
    fourth = b"\4" * 30_000
    store.put_blob(BlobId.of(fourth), fourth)
    assert store.find_missing([first, second, third]) == [second]


_MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
tmpfs /mnt/ram\\040disk tmpfs rw 0 0
proc /proc proc rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/dev/shm/cache", "tmpfs"),
        ("/dev/shm", "tmpfs"),
        ("/dev/shmem/cache", "ext4"),  # a sibling sharing the prefix is not under it
        ("/home/ci/cache", "ext4"),
        ("/mnt/ram disk/cache", "tmpfs"),  # /proc/mounts escapes the space
    ],
)
def test_the_filesystem_is_that_of_the_longest_mount_point_above(path: str, kind: str) -> None:
    assert filesystem_of(path, _MOUNTS) == kind
    assert filesystem_of(path, "") == "unknown"


def test_a_store_on_a_ram_filesystem_works_in_place_and_one_on_a_disk_does_not(
    tmp_path: pathlib.Path, tmpfs_path: pathlib.Path
) -> None:
    if filesystem_type(tmp_path) in RAM_FILESYSTEMS:
        print(f"SKIPPED: {tmp_path} is on a RAM filesystem, no disk to compare with")
        pytest.skip(f"{tmp_path} is on a RAM filesystem")
    on_disk = DiskStore(tmp_path / "s")
    assert not on_disk.works_in_memory and not on_disk.reads_in_memory
    assert "on tmpfs" not in on_disk.describe()
    in_ram = DiskStore(tmpfs_path / "s")
    assert in_ram.works_in_memory and in_ram.reads_in_memory
    assert f"{tmpfs_path / 's'} on tmpfs (" in in_ram.describe()


_STORE_LINE = re.compile(r"; ([\d,]+) entries taking ([\d,]+) bytes")


def test_stats_after_a_restart_are_exact(tmp_path: pathlib.Path) -> None:
    """Blobs of many sizes and shards, a big one, action results and the server's own
    records, written by a real server: a store opened on the directory afterwards (as a
    restarted server's) counts exactly every file, each with the space it takes, and
    says so in the line a server prints at start."""
    root = tmp_path / "s"
    server = ServerProcess(root).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            blobs = api.upload(*(os.urandom(n) for n in (1, 100, 4095, 4096, 4097, 70_000)))
            api.write(os.urandom(1_500_000))
            for i, d in enumerate(blobs):
                result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="o", digest=d)])
                api.ac.UpdateActionResult(
                    re_pb2.UpdateActionResultRequest(
                        action_digest=digest(b"action %d" % i), action_result=result
                    )
                )
        assert server.stop() == 0
    finally:
        server.kill()
    expected = counted_space(root)
    assert expected[0] >= len(blobs) + 1 + len(blobs)  # and the server's own records
    for _ in range(2):
        stats = DiskStore(root).stats()
        assert (stats.blobs, stats.bytes_used) == expected
    line = DiskStore(root).describe()
    match = _STORE_LINE.search(line)
    assert match, line
    assert (int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))) == expected


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    entries=st.lists(
        st.tuples(st.binary(min_size=1, max_size=9000), st.integers(0, 10**6)),
        min_size=1,
        max_size=40,
        unique_by=lambda e: e[0],
    )
)
def test_the_index_a_restart_loads_is_the_files_in_access_order(
    tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[bytes, int]]
) -> None:
    """Whatever the files and their access times, a new store on the directory indexes
    every one, oldest first (the order eviction follows), and counts exactly their space."""
    root = tmp_path_factory.mktemp("store")
    store = DiskStore(root, sync=False)
    base = time.time() - 10**7
    by_time = []
    for i, (data, age) in enumerate(entries):
        blob = BlobId.of(data)
        store.put_blob(blob, data)
        store.put_record("timings", f"key {i}", data)
        mtime = base + age + i / 1000  # distinct: the order among equal times is free
        for rel in (DiskStore._blob_rel(blob), DiskStore._record_rel("timings", f"key {i}")):
            os.utime(root / rel, (mtime, mtime))
            by_time.append((mtime, rel))
    reloaded = DiskStore(root, sync=False)
    stats = reloaded.stats()
    assert (stats.blobs, stats.bytes_used) == counted_space(root)
    index = reloaded.index
    assert isinstance(index, LocalIndex)
    assert list(index._lru) == [rel for _, rel in sorted(by_time)]


def test_a_file_gone_during_the_scan_is_left_out(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process sharing the directory may remove a file between the scan's listing
    and its stat: the index leaves it out and loads the rest."""
    store = DiskStore(tmp_path / "s", sync=False)
    kept = BlobId.of(b"kept")
    store.put_blob(kept, b"kept")
    gone = "ab" + "0" * 62
    listdir = os.listdir
    monkeypatch.setattr(
        os, "listdir", lambda fd: [*listdir(fd), gone] if isinstance(fd, int) else listdir(fd)
    )
    reloaded = DiskStore(tmp_path / "s", sync=False)
    assert reloaded.find_missing([kept]) == []
    assert reloaded.stats().blobs == 1
