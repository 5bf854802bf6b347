"""The memory store (`--storage memory://`): the store API, its LRU bound, and the real server."""

from __future__ import annotations

import gc
import os
import pathlib
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import slipstream.cache_server.cli
from slipstream.cache_server.server import ServerConfig, open_store
from slipstream.cache_server.storage.base import RecordKeyError, StoreFull
from slipstream.cache_server.storage.counting import CountingStore
from slipstream.cache_server.storage.memory import MemoryStore
from slipstream.cli import main
from slipstream.core.digests import EMPTY_BLOB, BlobId, DigestError
from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import bytestream_pb2_grpc as bs_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.support.reapi import Reapi, digest, rpc_error
from tests.support.server_process import ServerProcess, running, serve_exit


def _put(store: MemoryStore, data: bytes) -> BlobId:
    blob = BlobId.of(data)
    store.put_blob(blob, data)
    return blob


# ---- CAS ----
def test_blob_round_trip_without_copies() -> None:
    store = MemoryStore(None)
    data = os.urandom(10_000)
    blob = _put(store, data)
    got = store.get_blob(blob)
    assert got == data and got is data  # kept as the immutable bytes given, not copied
    assert store.find_blob(blob.hash) == blob
    other = BlobId.of(b"never stored")
    assert store.find_missing([other, blob, EMPTY_BLOB, other]) == [other, other]
    assert store.get_blob(other) is None
    assert store.read_blob(other) is None
    assert store.find_blob(other.hash) is None
    with pytest.raises(DigestError):
        store.find_blob("not-a-hash")


def test_empty_blob_is_always_present() -> None:
    store = MemoryStore(10)
    assert store.find_missing([EMPTY_BLOB]) == []
    assert store.get_blob(EMPTY_BLOB) == b""
    chunks = store.read_blob(EMPTY_BLOB)
    assert chunks is not None and list(chunks) == []
    assert store.find_blob(EMPTY_BLOB.hash) == EMPTY_BLOB
    store.put_blob(EMPTY_BLOB, b"")
    writer = store.open_writer(EMPTY_BLOB)
    writer.commit()
    assert store.stats().blobs == 0 and store.stats().bytes_used == 0


def test_read_blob_offsets_and_chunks() -> None:
    store = MemoryStore(None)
    data = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes
    blob = _put(store, data)
    for offset, chunk_size in [(0, 1 << 20), (0, 1000), (5, 1000), (10_000, 100), (3, 1)]:
        chunks = store.read_blob(blob, offset, chunk_size)
        assert chunks is not None
        got = list(chunks)
        assert b"".join(got) == data[offset:]
        assert all(len(c) == chunk_size for c in got[:-1])
        assert 0 < len(got[-1]) <= chunk_size
        assert all(type(c) is bytes for c in got)
    at_end = store.read_blob(blob, len(data), 7)
    assert at_end is not None and list(at_end) == []


def test_put_blob_verifies() -> None:
    store = MemoryStore(None)
    blob = BlobId.of(b"abc")
    with pytest.raises(DigestError):
        store.put_blob(blob, b"abd")  # right size, wrong hash
    with pytest.raises(DigestError):
        store.put_blob(blob, b"abcd")  # wrong size
    assert store.get_blob(blob) is None
    assert store.find_missing([blob]) == [blob]
    assert store.stats().bytes_used == 0


def test_writer_commit_and_abort() -> None:
    store = MemoryStore(None)
    data = os.urandom(50_000)
    blob = BlobId.of(data)
    writer = store.open_writer(blob)
    writer.write(data[:20_000])
    writer.write(data[20_000:])
    assert writer.committed_size == len(data)
    assert store.find_missing([blob]) == [blob]  # nothing visible before commit
    writer.commit()
    assert store.get_blob(blob) == data
    writer.abort()  # safe after commit
    with pytest.raises(DigestError):
        writer.write(b"more")
    with pytest.raises(DigestError):
        writer.commit()

    other = BlobId.of(b"aborted upload")
    dropped = store.open_writer(other)
    dropped.write(b"aborted")
    dropped.abort()
    dropped.abort()
    with pytest.raises(DigestError):
        dropped.write(b" upload")
    assert store.find_missing([other]) == [other]
    assert store.stats().blobs == 1


def test_writer_refuses_wrong_size_and_hash() -> None:
    store = MemoryStore(None)
    blob = BlobId.of(b"abc")
    too_long = store.open_writer(blob)
    too_long.write(b"ab")
    with pytest.raises(DigestError):
        too_long.write(b"cd")
    too_short = store.open_writer(blob)
    too_short.write(b"ab")
    with pytest.raises(DigestError):
        too_short.commit()
    wrong_hash = store.open_writer(blob)
    wrong_hash.write(b"abd")
    with pytest.raises(DigestError):
        wrong_hash.commit()
    with pytest.raises(DigestError):
        wrong_hash.commit()  # a failed commit also ends the write
    assert store.get_blob(blob) is None
    assert store.stats().bytes_used == 0


# ---- records ----
def test_records_api() -> None:
    store = MemoryStore(None)
    assert store.put_record("layers", "deps/linux/1", b"one", overwrite=False)
    assert not store.put_record("layers", "deps/linux/1", b"two", overwrite=False)
    assert store.get_record("layers", "deps/linux/1") == b"one"
    assert store.put_record("layers", "deps/linux/1", b"ONE")  # overwrite by default
    assert store.get_record("layers", "deps/linux/1") == b"ONE"
    store.put_record("layers", "deps/mac/1", b"three")
    store.put_record("layers", "deps/linux/2", b"two!")
    store.put_record("layers", "deps/linux", b"no slash")
    store.put_record("timings", "deps/linux/9", b"other namespace")
    infos = store.list_records("layers", "deps/linux/")
    assert [(r.key, r.size) for r in infos] == [("deps/linux/1", 3), ("deps/linux/2", 4)]
    assert all(r.modified > 0 for r in infos)
    assert [r.key for r in store.list_records("layers")] == [
        "deps/linux",
        "deps/linux/1",
        "deps/linux/2",
        "deps/mac/1",
    ]
    assert store.list_records("nothing-here") == []
    store.delete_record("layers", "deps/mac/1")
    store.delete_record("layers", "deps/mac/1")  # absent: no error
    assert store.get_record("layers", "deps/mac/1") is None
    assert store.get_record("timings", "deps/linux/1") is None
    for namespace, key in [("layers", ""), ("Bad NS", "k"), ("layers", "x" * 1000)]:
        with pytest.raises(RecordKeyError):
            store.put_record(namespace, key, b"x")
        with pytest.raises(RecordKeyError):
            store.get_record(namespace, key)
    with pytest.raises(RecordKeyError):
        store.list_records("Bad NS", "k")


def test_action_results_count_toward_the_bound_and_can_be_deleted() -> None:
    store = MemoryStore(100)
    store.put_record("ac", "a", b"x" * 40)
    assert store.stats().bytes_used == 40
    store.put_record("ac", "a", b"x" * 30)  # replacing counts the new size only
    assert (store.stats().blobs, store.stats().bytes_used) == (1, 30)
    assert not store.put_record("ac", "a", b"y" * 10, overwrite=False)
    assert store.get_record("ac", "a") == b"x" * 30
    store.delete_record("ac", "a")
    assert (store.stats().blobs, store.stats().bytes_used) == (0, 0)
    assert store.list_records("ac") == []


# ---- LRU bound ----
def test_eviction_is_least_recently_used_first() -> None:
    store = MemoryStore(100)
    a, b, c = (_put(store, bytes([i]) * 30) for i in (1, 2, 3))
    store.put_record("ac", "result", b"r" * 10)  # 100 bytes: full, nothing evicted
    assert store.stats().evictions == 0
    assert store.find_missing([a]) == []  # refreshes a: b is now the oldest
    d = _put(store, b"\4" * 30)
    assert store.find_missing([a, b, c, d]) == [b]
    assert store.get_record("ac", "result") == b"r" * 10
    assert store.get_blob(c) is not None  # c is now newer than a
    assert store.get_record("ac", "result") is not None  # and the result newer still
    e = _put(store, b"\5" * 40)  # 140 bytes: a, then d (30 each) must go
    assert store.find_missing([a, c, d, e]) == [a, d]  # the record is the oldest now
    assert [r.key for r in store.list_records("ac")] == ["result"]  # listing refreshes nothing
    f = _put(store, b"\6" * 30)
    assert store.get_record("ac", "result") is None
    assert store.list_records("ac") == []
    assert store.find_missing([c, e, f]) == []
    stats = store.stats()
    assert (stats.blobs, stats.bytes_used, stats.max_bytes, stats.evictions) == (3, 100, 100, 4)


def test_finding_by_hash_refreshes() -> None:
    store = MemoryStore(60)
    a, b = _put(store, b"\1" * 30), _put(store, b"\2" * 30)
    assert store.find_blob(a.hash) == a
    c = _put(store, b"\3" * 30)
    assert store.find_missing([a, b, c]) == [b]


def test_writer_commit_evicts_and_refreshes() -> None:
    store = MemoryStore(60)
    a, b = _put(store, b"\1" * 30), _put(store, b"\2" * 30)
    writer = store.open_writer(a)  # a is stored already: committing again refreshes it
    writer.write(b"\1" * 30)
    writer.commit()
    c = BlobId.of(b"\3" * 30)
    writer = store.open_writer(c)
    writer.write(b"\3" * 30)
    writer.commit()
    assert store.find_missing([a, b, c]) == [b]
    assert store.stats().bytes_used == 60


def test_what_can_never_fit_is_refused() -> None:
    store = MemoryStore(100)
    kept = _put(store, b"\1" * 50)
    exact = _put(store, b"\2" * 100)  # exactly the bound fits, evicting the rest
    assert store.find_missing([kept, exact]) == [kept]
    big = b"\3" * 101
    with pytest.raises(StoreFull):
        store.put_blob(BlobId.of(big), big)
    with pytest.raises(StoreFull):
        store.open_writer(BlobId.of(big))
    with pytest.raises(StoreFull):
        store.put_record("ac", "big", big)
    with pytest.raises(StoreFull):
        store.put_record("ccache", "big", big)
    assert store.find_missing([exact]) == []  # a refusal evicts nothing
    assert store.get_record("ac", "big") is None
    assert store.stats().evictions == 1
    with pytest.raises(StoreFull):  # every namespace is bounded
        store.put_record("timings", "big", big)


def test_open_writers_count_against_the_bound() -> None:
    """What open writers hold is memory too: it evicts older entries, and writers may
    not hold more than the bound between them (which once let many concurrent uploads
    take memory without limit)."""
    store = MemoryStore(1000)
    old = [_put(store, bytes([i]) * 300) for i in range(3)]
    one_data, two_data = b"\x11" * 600, b"\x22" * 600
    one = store.open_writer(BlobId.of(one_data))
    one.write(one_data[:400])  # 900 stored + 400 held: the oldest goes
    assert store.find_missing(old) == old[:1]
    two = store.open_writer(BlobId.of(two_data))
    two.write(two_data[:500])
    two.write(two_data[500:])  # 1,000 held: nothing stored is left
    assert store.find_missing(old) == old
    three_data = b"\x33" * 200
    three = store.open_writer(BlobId.of(three_data))
    with pytest.raises(StoreFull, match="uploads in progress"):
        three.write(three_data)
    one.abort()  # its 400 are free again
    three.write(three_data)
    three.commit()
    two.commit()
    assert store.stats().bytes_used == 800
    assert store.get_blob(BlobId.of(two_data)) == two_data
    with pytest.raises(DigestError):  # a refused write holds nothing
        store.open_writer(BlobId.of(b"x")).write(b"too long")
    big = store.open_writer(BlobId.of(b"\x44" * 200))
    big.write(b"\x44" * 200)  # room for exactly what is stored and this
    big.abort()


@pytest.mark.parametrize("namespace", ["timings", "splitplans", "splitqueue", "layers"])
def test_records_of_every_namespace_share_the_bound_and_the_lru(namespace: str) -> None:
    store = MemoryStore(200)
    for i in range(3):
        store.put_record(namespace, f"suite/{i}", b"r" * 60)
    assert store.get_record(namespace, "suite/0") == b"r" * 60  # now the newest
    blob = _put(store, b"b" * 50)  # 230 bytes: the least recently used record goes
    assert [r.key for r in store.list_records(namespace)] == ["suite/0", "suite/2"]
    assert store.find_missing([blob]) == []
    stats = store.stats()
    assert (stats.bytes_used, stats.evictions) == (170, 1)


def test_describe_says_bound_and_that_contents_are_lost() -> None:
    store = MemoryStore(1 << 20)
    _put(store, b"described")
    text = store.describe()
    assert text.startswith("memory store (up to 1,048,576 bytes; 1 entries, 9 bytes;")
    assert "lost at exit" in text
    assert MemoryStore(None).describe().startswith("memory store (no size bound;")


def test_threads_share_one_consistent_store() -> None:
    store = MemoryStore(50_000)
    unbounded = MemoryStore()
    payloads = [os.urandom(1000 + i) for i in range(120)]
    claims: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def work(n: int) -> None:
        try:
            start.wait()
            for i, data in enumerate(payloads):
                blob = BlobId.of(data)
                if (i + n) % 2:
                    store.put_blob(blob, data)
                else:
                    writer = store.open_writer(blob)
                    writer.write(data[:500])
                    writer.write(data[500:])
                    writer.commit()
                got = store.get_blob(blob)
                assert got is None or got == data
                chunks = store.read_blob(blob, 100, 333)
                assert chunks is None or b"".join(chunks) == data[100:]
                store.find_missing([BlobId.of(p) for p in payloads[: i + 1]])
                # Records of every kind are under the bound, so a claim there may be
                # evicted and made again: the once-only claims go to an unbounded store.
                store.put_record("split", f"claim/{i}", str(n).encode(), overwrite=False)
                if unbounded.put_record("split", f"claim/{i}", str(n).encode(), overwrite=False):
                    claims.append((f"claim/{i}", n))
                store.put_record("ac", f"r/{n}/{i}", data[:50])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so races show up
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    # Each claim went to exactly one thread, and the record holds that thread's value.
    assert sorted(key for key, _ in claims) == sorted(f"claim/{i}" for i in range(120))
    for key, n in claims:
        assert unbounded.get_record("split", key) == str(n).encode()
    # The byte count matches what is actually held, within the bound.
    stats = store.stats()
    held = [p for p in payloads if store.get_blob(BlobId.of(p)) is not None]
    results = store.list_records("ac") + store.list_records("split")
    assert stats.bytes_used == sum(map(len, held)) + sum(r.size for r in results)
    assert stats.blobs == len(held) + len(results)
    assert stats.bytes_used <= 50_000
    assert stats.evictions > 0


@settings(max_examples=200, deadline=None)
@given(
    blobs=st.lists(st.binary(max_size=3000), min_size=1, max_size=6),
    reads=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 3100), st.integers(1, 1500)), max_size=10
    ),
    pieces=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    streamed=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_cas_round_trip_property(
    blobs: list[bytes],
    reads: list[tuple[int, int, int]],
    pieces: list[int],
    streamed: list[bool],
) -> None:
    """Whether a blob came whole or streamed in pieces, every read gives its bytes back."""
    store = MemoryStore(None)
    ids = []
    for data, stream in zip(blobs, streamed, strict=False):
        if not stream:
            ids.append(_put(store, data))
            continue
        blob = BlobId.of(data)
        writer = store.open_writer(blob)
        pos, i = 0, 0
        while pos < len(data):
            writer.write(data[pos : pos + pieces[i % len(pieces)]])
            pos += pieces[i % len(pieces)]
            i += 1
        writer.commit()
        ids.append(blob)
    assert store.find_missing(ids) == []
    for blob, data in zip(ids, blobs, strict=True):
        assert store.get_blob(blob) == data
    for which, offset, chunk_size in reads:
        data = blobs[which % len(blobs)]
        offset %= len(data) + 1
        chunks = store.read_blob(ids[which % len(blobs)], offset, chunk_size)
        assert chunks is not None
        got = list(chunks)
        assert b"".join(got) == data[offset:]
        assert all(0 < len(c) <= chunk_size for c in got)


# ---- the server and its command line ----
def test_server_on_memory_storage() -> None:
    server = ServerProcess("memory://", ["--max-size", "100K"])
    with running(server), grpc.insecure_channel(server.address) as ch:
        text = "".join(server.output)
        assert "storing in the memory store (up to 102,400 bytes;" in text, text
        assert "lost at exit" in text
        api = Reapi(ch)
        small = [b"first blob", b"second blob", os.urandom(20_000)]
        digests = api.upload(*small)
        absent = digest(b"not uploaded")
        assert api.missing(absent, *digests) == [absent]
        resp = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[*digests, absent]))
        assert [r.data for r in resp.responses[:3]] == small
        assert resp.responses[3].status.code == grpc.StatusCode.NOT_FOUND.value[0]
        streamed = os.urandom(60_000)
        assert api.write(streamed, chunk=7_000).committed_size == len(streamed)
        assert api.read(digest(streamed)) == streamed
        assert api.read(digest(streamed), offset=12_345, limit=1000) == streamed[12_345:13_345]
        # 60,000 + 20,021 + one more 30,000 is over 100K: the oldest blobs are evicted.
        (later,) = api.upload(b"\7" * 30_000)
        assert api.missing(*digests, digest(streamed), later) == digests
        err = rpc_error(lambda: api.write(b"\5" * 200_000, upload_id="too-big"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_uploads_in_progress_are_bounded_by_max_size() -> None:
    """Unfinished ByteStream uploads on a memory store hold at most --max-size between
    them: past that, a write is RESOURCE_EXHAUSTED, saying why, and the rest go on."""
    server = ServerProcess("memory://", ["--max-size", "6M"])
    with running(server), grpc.insecure_channel(server.address) as ch:
        stub = bs_grpc.ByteStreamStub(ch)
        release = threading.Event()
        datas = [os.urandom(3 << 20) for _ in range(3)]

        def requests(i: int) -> Iterator[bs_pb2.WriteRequest]:
            d = digest(datas[i])
            name = f"uploads/held-{i}/blobs/{d.hash}/{d.size_bytes}"
            yield bs_pb2.WriteRequest(resource_name=name, data=datas[i][: 5 << 19])
            release.wait(30)
            yield bs_pb2.WriteRequest(
                resource_name=name,
                write_offset=5 << 19,
                data=datas[i][5 << 19 :],
                finish_write=True,
            )

        calls = []
        for i in range(3):
            calls.append(stub.Write.future(requests(i)))
            time.sleep(0.5)  # in this order
        release.set()  # the refusal comes with the next message
        refused = calls[2].exception(timeout=10)
        assert isinstance(refused, grpc.RpcError)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "uploads in progress hold" in (refused.details() or "")
        assert [c.result(timeout=10).committed_size for c in calls[:2]] == [3 << 20] * 2
        api = Reapi(ch)
        assert api.read(digest(datas[1])) == datas[1]


def test_s3_flags_with_memory_storage_are_a_usage_error() -> None:
    for args, message in [
        (["--s3-endpoint", "http://x"], "--s3-endpoint needs --storage s3://"),
        (["--cache-dir", "/tmp/x"], "--cache-dir needs --storage s3://"),
    ]:
        proc = serve_exit("--storage", "memory://", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_memory_storage_from_flag_environment_or_file(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    configs: list[ServerConfig] = []

    async def record(config: ServerConfig) -> None:
        configs.append(config)

    monkeypatch.setattr(slipstream.cache_server.cli, "serve", record)
    for name in ("SLIPSTREAM_CONFIG", "SLIPSTREAM_STORAGE", "SLIPSTREAM_MAX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    toml = tmp_path / "slipstream.toml"
    toml.write_text('storage = "memory://"\nmax_size = "1M"\n')
    assert main(["serve", "--storage", "memory://", "--max-size", "2K"]) == 0
    with monkeypatch.context() as mp:
        mp.setenv("SLIPSTREAM_STORAGE", "memory://")
        assert main(["serve"]) == 0
    assert main(["serve", "--config", str(toml)]) == 0
    assert main(["serve", "--storage", str(tmp_path / "disk")]) == 0
    assert [(c.in_memory, c.storage, c.max_size) for c in configs] == [
        (True, None, 2048),
        (True, None, None),
        (True, None, 1 << 20),
        (False, tmp_path / "disk", None),
    ]
    store = open_store(configs[0])
    assert isinstance(store, CountingStore)  # what the metrics read, around the backend
    assert isinstance(store.inner, MemoryStore) and store.inner.max_size == 2048
    assert main(["serve", "--storage", "memory://somewhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "write just memory://" in err, err


def test_server_streams_memory_blobs_in_place_across_pieces() -> None:
    """ByteStream reads from the memory store take its chunks on the event loop
    (Store.reads_in_memory): blobs of several chunks, offsets and limits across
    the pieces they were written in, and compressed reads all come back whole."""
    assert MemoryStore.reads_in_memory
    server = ServerProcess("memory://")
    with running(server), grpc.insecure_channel(server.address) as ch:
        api = Reapi(ch)
        streamed = os.urandom(2_500_000)  # three read chunks, written in nine pieces
        assert api.write(streamed, chunk=300_000).committed_size == len(streamed)
        d = digest(streamed)
        assert api.read(d) == streamed
        assert api.read(d, offset=299_999, limit=1_200_002) == streamed[299_999:1_500_001]
        assert api.read(d, offset=len(streamed)) == b""
        name = f"compressed-blobs/zstd/{d.hash}/{d.size_bytes}"
        frames = api.bytestream.Read(bs_pb2.ReadRequest(resource_name=name))
        reader = zstandard.ZstdDecompressor().stream_reader(b"".join(r.data for r in frames))
        assert reader.read() == streamed
        absent = digest(b"never written")
        err = rpc_error(lambda: api.read(absent))
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_records_and_blobs_leave_the_cycle_collector_alone() -> None:
    """What the store holds per record or small blob is untracked by the cycle collector
    once it has looked at it, so a store of a million action results does not make
    every full collection walk a million objects."""
    store = MemoryStore()
    for i in range(3):
        store.put_record("ac", f"action-{i}", b"result %d" % i)
        store.put_record("layers", f"key-{i}", b"layer %d" % i)
        store.put_blob(BlobId.of(b"blob %d" % i), b"blob %d" % i)
    gc.collect()
    held: list[object] = [r for records in store._records.values() for r in records.values()]
    held += [*store._lru, *store._lru.values()]  # 6 records and 3 blobs
    assert len(held) == 6 + 18
    assert not [h for h in held if gc.is_tracked(h)]
    assert store.get_record("ac", "action-1") == b"result 1"
    assert [(r.key, r.size) for r in store.list_records("layers")] == [
        ("key-0", 7),
        ("key-1", 7),
        ("key-2", 7),
    ]
