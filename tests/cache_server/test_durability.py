"""What the server acknowledges is on the device: fsync of the file before its rename,
of the directory after, before the answer (in the store, and on the real server)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest

from slipstream.cache_server.storage.disk import RAM_FILESYSTEMS, DiskStore, filesystem_type
from slipstream.cache_server.storage.memory import MemoryStore
from slipstream.cache_server.storage.tiered import TieredStore
from slipstream.core.digests import BlobId
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, running

Event = tuple[str, ...]


@pytest.fixture
def disk_path(tmp_path: pathlib.Path) -> pathlib.Path:
    """tmp_path, where it is on a device (a RAM filesystem has nothing to sync to)."""
    kind = filesystem_type(tmp_path)
    if kind in RAM_FILESYSTEMS:
        print(f"SKIPPED: {tmp_path} is on {kind}, where the store syncs nothing")
        pytest.skip(f"{tmp_path} is on {kind}, where the store syncs nothing")
    return tmp_path


@pytest.fixture
def syscalls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Event]]:
    """Every fsync (by the path of its fd), rename and link the store made, in order."""
    events: list[Event] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        real_replace(src, dst)
        events.append(("rename", str(src), str(dst)))

    def link(src: str, dst: str) -> None:
        real_link(src, dst)
        events.append(("link", str(src), str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    yield events


def _check_durable(events: list[Event], final: pathlib.Path) -> None:
    """final came from a rename (or link) of a file synced before it, and its directory
    was synced after it."""
    (at,) = [i for i, e in enumerate(events) if e[0] != "fsync" and e[2] == str(final)]
    tmp = events[at][1]
    assert ("fsync", tmp) in events[:at], f"{tmp} not synced before it became {final}"
    assert ("fsync", str(final.parent)) in events[at:], f"{final.parent} not synced after"


def _blob(data: bytes) -> BlobId:
    return BlobId.of(data)


def test_each_write_syncs_its_file_then_its_directory(
    disk_path: pathlib.Path, syscalls: list[Event]
) -> None:
    store = DiskStore(disk_path / "s")
    root = (disk_path / "s").resolve()
    syscalls.clear()
    data = b"a blob that must survive a power cut"
    store.put_blob(_blob(data), data)
    _check_durable(syscalls, root / "cas" / _blob(data).hash[:2] / _blob(data).hash)

    big = os.urandom(3 << 20)
    writer = store.open_writer(_blob(big))
    for i in range(0, len(big), 1 << 20):
        writer.write(big[i : i + (1 << 20)])
    writer.commit()  # a ByteStream write
    _check_durable(syscalls, root / "cas" / _blob(big).hash[:2] / _blob(big).hash)

    store.put_record("ac", "action-1", b"an action result")
    assert store.put_record("layers", "deps-1", b"a layer", overwrite=False)
    _check_durable(syscalls, root / "records" / "ac" / "action-1")
    _check_durable(syscalls, root / "records" / "layers" / "deps-1")
    # The namespaces' directories were new: their names are synced into records/.
    assert ("fsync", str(root / "records")) in syscalls

    syscalls.clear()
    store.delete_record("layers", "deps-1")
    assert syscalls == [("fsync", str(root / "records" / "layers"))]


def test_a_batch_syncs_its_files_together_then_each_directory_once(
    disk_path: pathlib.Path, syscalls: list[Event]
) -> None:
    store = DiskStore(disk_path / "s")
    root = (disk_path / "s").resolve()
    blobs = [os.urandom(100) for _ in range(60)]
    bad = (_blob(b"claimed"), b"other bytes")
    syscalls.clear()
    refused = store.put_blobs([(_blob(b), b) for b in blobs] + [bad], lambda pair: pair)
    assert refused[:-1] == [None] * 60 and refused[-1] is not None
    finals = [root / "cas" / _blob(b).hash[:2] / _blob(b).hash for b in blobs]
    for final in finals:
        _check_durable(syscalls, final)
    renames = [i for i, e in enumerate(syscalls) if e[0] == "rename"]
    file_syncs = [i for i, e in enumerate(syscalls) if e[0] == "fsync" and "/s/tmp/" in e[1]]
    dir_syncs = [e[1] for e in syscalls if e[0] == "fsync" and "/s/cas/" in e[1]]
    # All files synced before the first rename; each directory once, after the last.
    assert len(file_syncs) == 60 and max(file_syncs) < min(renames)
    assert sorted(dir_syncs) == sorted({str(f.parent) for f in finals})
    assert all(store.get_blob(_blob(b)) == b for b in blobs)
    assert not os.listdir(root / "tmp")  # the refused blob left nothing behind


def test_without_sync_nothing_is_synced(disk_path: pathlib.Path, syscalls: list[Event]) -> None:
    store = DiskStore(disk_path / "s", sync=False)
    store.put_blob(_blob(b"x"), b"x")
    store.put_blobs([(_blob(b"y"), b"y")], lambda pair: pair)
    store.put_record("ac", "k", b"v")
    store.delete_record("ac", "k")
    assert [e for e in syscalls if e[0] == "fsync"] == []
    assert "not synced" in store.describe()


def test_the_disk_tier_syncs_writes_not_read_fills(
    disk_path: pathlib.Path, syscalls: list[Event]
) -> None:
    shared = MemoryStore()
    tier = TieredStore(DiskStore(disk_path / "tier"), shared)
    cas = (disk_path / "tier").resolve() / "cas"
    written, batch, read = b"written through", b"in a batch", b"only in the shared store"
    shared.put_blob(_blob(read), read)
    syscalls.clear()
    tier.put_blob(_blob(written), written)
    assert tier.put_blobs([(_blob(batch), batch)], lambda pair: pair) == [None]
    for data in (written, batch):
        _check_durable(syscalls, cas / _blob(data).hash[:2] / _blob(data).hash)
    syscalls.clear()
    assert tier.get_blob(_blob(read)) == read  # filled on the way, not synced
    filled = cas / _blob(read).hash[:2] / _blob(read).hash
    assert filled.exists()
    # (A shard directory made for it has its name synced, once: that is not the blob's.)
    assert [e for e in syscalls if e[0] == "fsync" and e[1] != str(cas)] == []


# ---------------------------------------------------------------- the real server

STRACE = shutil.which("strace")


def _traced(server: ServerProcess, log: pathlib.Path) -> subprocess.Popen[bytes]:
    """strace attached to every thread of the server, logging fsyncs and renames with
    the paths of their file descriptors."""
    assert STRACE is not None and server.proc is not None
    messages = log.with_suffix(".err")
    with open(messages, "wb") as err:
        traced = ("-e", "trace=fsync,fdatasync,rename,renameat,renameat2")
        tracer = subprocess.Popen(
            [STRACE, "-f", "-y", *traced, "-o", str(log), "-p", str(server.proc.pid)],
            stderr=err,
        )
    deadline = time.monotonic() + 10
    while b"attached" not in messages.read_bytes() and time.monotonic() < deadline:
        if tracer.poll() is not None:
            reason = messages.read_text().strip()
            print(f"SKIPPED: strace cannot attach to the server: {reason}")
            pytest.skip(f"strace cannot attach to the server: {reason}")
        time.sleep(0.05)
    time.sleep(0.5)  # every thread attached
    return tracer


def _acknowledged_writes(api: Reapi) -> list[str]:
    """A batch, a ByteStream write and an action result; the hashes the store holds."""
    blobs = [os.urandom(200) for _ in range(20)]
    api.upload(*blobs)
    big = os.urandom(3 << 20)
    api.write(big, chunk=1 << 20)
    action = digest(b"an action")
    api.ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(
            action_digest=action, action_result=re_pb2.ActionResult(exit_code=0)
        )
    )
    return [digest(b).hash for b in [*blobs, big]]


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_the_server_syncs_before_it_answers(fsync: bool, disk_path: pathlib.Path) -> None:
    storage = disk_path / "store"
    env = {} if fsync else {"SLIPSTREAM_NO_FSYNC": "true"}  # the setting, as --no-fsync
    log = disk_path / "strace.log"
    with running(ServerProcess(storage, env=env)) as server:
        assert ("not synced" in "".join(server.output)) is not fsync
        tracer = _traced(server, log)
        try:
            with grpc.insecure_channel(server.address) as channel:
                hashes = _acknowledged_writes(Reapi(channel))
        finally:
            tracer.terminate()
            tracer.wait(10)
    lines = log.read_text().splitlines()
    syncs = [line for line in lines if " fsync(" in line or " fdatasync(" in line]
    if not fsync:
        assert syncs == []
        return
    # strace shows an fd's path as <path> (-y), a rename's arguments in quotes.
    for h in hashes:
        (at,) = [
            i
            for i, line in enumerate(lines)
            if "rename" in line and f'/{h}"' in line and "= -1" not in line
        ]
        tmp = lines[at].split('"')[1]
        assert any(f"<{tmp}>" in line for line in lines[:at] if line in syncs), h
        assert any(f"<{storage}/cas/{h[:2]}>" in line for line in lines[at:] if line in syncs), h
    assert any(f"<{storage}/records/ac>" in line for line in syncs)
