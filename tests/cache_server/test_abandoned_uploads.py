"""Uploads a client abandons are dropped after --upload-idle-timeout, open or left for a
resume, and count against the caller's --max-streams meanwhile; running out of file
handles is UNAVAILABLE, not INTERNAL, and passes (issue 19, item 3)."""

from __future__ import annotations

import functools
import os
import pathlib
import resource
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import bytestream_pb2_grpc as bs_grpc
from tests.support.proc_stats import peak_rss_bytes
from tests.support.reapi import Reapi, digest, rpc_error
from tests.support.server_process import ServerProcess, running

IDLE = 2.0  # seconds: --upload-idle-timeout of these servers


def _open_fds(server: ServerProcess) -> int:
    assert server.proc is not None
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


class Abandoned:
    """ByteStream writes that send part of a blob and then nothing, their calls open."""

    def __init__(self, channel: grpc.Channel, count: int, sent: int, size: int) -> None:
        self.stop = threading.Event()
        self.names: list[str] = []
        self.datas: list[bytes] = []
        stub = bs_grpc.ByteStreamStub(channel)
        self.calls = []
        for i in range(count):
            data = os.urandom(8) * (size // 8)
            d = digest(data)
            name = f"uploads/abandoned-{i}-{os.getpid()}/blobs/{d.hash}/{d.size_bytes}"
            self.names.append(name)
            self.datas.append(data)
            self.calls.append(stub.Write.future(self._requests(name, data[:sent])))

    def _requests(self, name: str, part: bytes) -> Iterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=name, write_offset=0, data=part)
        self.stop.wait(60)

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()
        self.stop.set()

    def answers(self, timeout: float) -> list[grpc.StatusCode]:
        codes = []
        for call in self.calls:
            try:
                call.result(timeout=timeout)
                codes.append(grpc.StatusCode.OK)
            except grpc.FutureCancelledError:
                codes.append(grpc.StatusCode.CANCELLED)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        self.stop.set()
        return codes


def _committed(channel: grpc.Channel, name: str) -> int:
    stub = bs_grpc.ByteStreamStub(channel)
    return stub.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name)).committed_size


def _all_committed(channel: grpc.Channel, names: list[str], size: int) -> bool:
    return all(_committed(channel, name) == size for name in names)


def test_open_idle_uploads_are_dropped_with_their_files(tmp_path: pathlib.Path) -> None:
    storage = tmp_path / "store"
    server = ServerProcess(storage, ["--upload-idle-timeout", f"{IDLE}s"])
    with running(server):
        channel = server.channel()
        Reapi(channel).upload(b"warm up")
        baseline = _open_fds(server)
        uploads = Abandoned(channel, 30, sent=1, size=16)
        _wait_for(lambda: _open_fds(server) >= baseline + 30, 20)
        started = time.monotonic()
        codes = uploads.answers(timeout=IDLE + 10)
        assert set(codes) == {grpc.StatusCode.ABORTED}, codes
        assert time.monotonic() - started < IDLE + 5
        _wait_for(lambda: _open_fds(server) <= baseline + 2, 10)
        # A dropped upload's file is closed, then removed: wait for both.
        _wait_for(lambda: list((storage / "tmp").iterdir()) == [], 10)
        assert [_committed(channel, n) for n in uploads.names] == [0] * 30


def test_uploads_left_for_a_resume_are_dropped_and_their_memory_reused() -> None:
    server = ServerProcess("memory://", ["--upload-idle-timeout", f"{IDLE}s"])
    count, sent = 6, 6 << 20
    with running(server):
        channel = server.channel()
        rounds = []
        for _ in range(2):
            uploads = Abandoned(channel, count, sent=sent, size=2 * sent)
            _wait_for(functools.partial(_all_committed, channel, uploads.names, sent), 30)
            uploads.cancel()  # the client goes away: the upload is kept for a resume
            rounds.append(peak_rss_bytes(server.proc.pid))  # type: ignore[union-attr]
            _wait_for(functools.partial(_all_committed, channel, uploads.names, 0), 10)
        # The second round reused what the dropped first one freed.
        growth = rounds[1] - rounds[0]
        assert growth < count * sent // 2, f"peak RSS grew by {growth:,} bytes"


def test_uploads_left_for_a_resume_count_against_max_streams(tmp_path: pathlib.Path) -> None:
    server = ServerProcess(
        tmp_path / "store", ["--upload-idle-timeout", f"{IDLE}s", "--max-streams", "3"]
    )
    with running(server):
        channel = server.channel()
        api = Reapi(channel)
        uploads = Abandoned(channel, 3, sent=1, size=16)
        time.sleep(1.0)  # the server takes the first messages (asking would be a 4th call)
        uploads.cancel()
        time.sleep(0.3)  # the server sees the cancellations
        refused = rpc_error(lambda: api.missing(digest(b"x")))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        # After the timeout all three are dropped (one by one: the first drop already
        # lets a call pass), and the caller's calls pass again.
        _wait_for(lambda: _passes(api), IDLE * 2 + 5)
        _wait_for(lambda: [_committed(channel, n) for n in uploads.names] == [0, 0, 0], 5)
        assert _passes(api)


def test_a_caller_at_its_limit_can_resume_the_uploads_it_left(tmp_path: pathlib.Path) -> None:
    """Uploads left for a resume fill the caller's --max-streams: other calls are
    refused, but asking about one of them and resuming it are not (they take up the
    upload's own count), and the resumed blob is stored whole."""
    server = ServerProcess(
        tmp_path / "store", ["--upload-idle-timeout", "60s", "--max-streams", "2"]
    )
    with running(server):
        channel = server.channel()
        api = Reapi(channel)
        uploads = Abandoned(channel, 2, sent=8, size=64)
        time.sleep(1.0)
        # The streams end unfinished: what they sent is kept for a resume.
        uploads.stop.set()
        assert uploads.answers(timeout=10) == [grpc.StatusCode.INVALID_ARGUMENT] * 2
        assert rpc_error(lambda: api.missing(digest(b"x"))).code() == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        other = digest(b"a new upload")
        new_name = f"uploads/new/blobs/{other.hash}/{other.size_bytes}"
        assert rpc_error(lambda: _committed(channel, new_name)).code() == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        refused = rpc_error(lambda: api.write(b"a new upload", upload_id="new"))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "the limit is 2" in refused.details()

        name, data = uploads.names[0], uploads.datas[0]
        assert _committed(channel, name) == 8
        stub = bs_grpc.ByteStreamStub(channel)
        rest = bs_pb2.WriteRequest(
            resource_name=name, write_offset=8, data=data[8:], finish_write=True
        )
        assert stub.Write(iter([rest])).committed_size == len(data)
        # One upload left held: the caller has a call to spare again.
        assert api.read(digest(data)) == data


def _passes(api: Reapi) -> bool:
    try:
        api.missing(digest(b"x"))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False
    return True


def test_out_of_file_handles_is_unavailable_and_passes(tmp_path: pathlib.Path) -> None:
    storage = tmp_path / "store"
    server = ServerProcess(storage, ["--upload-idle-timeout", f"{IDLE}s"])
    with running(server):
        assert server.proc is not None
        channel = server.channel()
        api = Reapi(channel)
        stored = api.upload(b"stored before")[0]
        limit = _open_fds(server) + 10
        resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        uploads = Abandoned(channel, 30, sent=1, size=16)
        time.sleep(0.5)
        failed = [c.exception() for c in uploads.calls if c.done()]
        assert failed, "no upload failed: the file-handle limit was not reached"
        assert all(isinstance(e, grpc.RpcError) for e in failed), failed
        assert {e.code() for e in failed} == {grpc.StatusCode.UNAVAILABLE}  # type: ignore[union-attr]
        assert "open files" in failed[0].details()  # type: ignore[union-attr]
        codes = uploads.answers(timeout=IDLE + 10)
        assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}, codes
        # The held handles are back: everything works again.
        blob = b"after " * 1000
        api.upload(blob)
        assert api.read(digest(blob)) == blob
        assert api.read(stored) == b"stored before"
        big = os.urandom(3 << 20)
        assert api.write(big, upload_id="after").committed_size == len(big)
        server.stop()
    assert "Traceback" not in "".join(server.output)
