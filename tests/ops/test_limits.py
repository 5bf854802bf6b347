"""Per-caller limits over a real socket: blob size, batch size, calls in flight.

"limited" has its own limits in the token file; "trusted" has the server-wide
ones from the flags (larger), so one caller's limits never bind another.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import grpc
import pytest

from slipstream.cache_server.auth import OPEN
from slipstream.cache_server.calls import Call
from slipstream.cache_server.limits import LimitEnforcer
from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.ops.helpers import Token, channel_for, code_of, write_token_file
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, running

LIMITED = Token(
    "limited",
    "tok-limited-5be0",
    ("read", "cas-write"),
    (("max_blob_size", "1K"), ("max_batch_size", "4K"), ("max_streams", 2)),
)
TRUSTED = Token("trusted", "tok-trusted-90c2", ("read", "cas-write", "ac-write"))
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("limits")
    token_file = write_token_file(root / "tokens.toml", [LIMITED, TRUSTED])
    args = ["--token-file", str(token_file), "--max-blob-size", "64K", "--max-streams", "50"]
    with running(ServerProcess(root / "store", args)) as server:
        yield server


def test_capabilities_advertise_the_callers_limits(limits_server: ServerProcess) -> None:
    with channel_for(limits_server, LIMITED.value) as ch:
        caps = Reapi(ch).caps.GetCapabilities(re_pb2.GetCapabilitiesRequest()).cache_capabilities
        assert caps.max_batch_total_size_bytes == 4096
        assert caps.max_cas_blob_size_bytes == 1024
    with channel_for(limits_server, TRUSTED.value) as ch:
        caps = Reapi(ch).caps.GetCapabilities(re_pb2.GetCapabilitiesRequest()).cache_capabilities
        assert caps.max_batch_total_size_bytes > 4096
        assert caps.max_cas_blob_size_bytes == 64 * 1024


def test_blob_over_the_callers_size_limit_is_refused(limits_server: ServerProcess) -> None:
    big = b"b" * 2000
    with channel_for(limits_server, LIMITED.value) as ch:
        api = Reapi(ch)
        code, message = code_of(lambda: api.upload(big))
        assert code is EXHAUSTED
        assert message == (
            "a blob of 2,000 bytes is over the 1,024-byte blob size limit of caller 'limited'"
        )
        code, message = code_of(lambda: api.write(big, chunk=500, upload_id="big"))
        assert code is EXHAUSTED and "1,024-byte blob size limit" in message
        assert api.missing(digest(big)) == [digest(big)]
        api.upload(b"s" * 1000)  # under the limit: fine
    with channel_for(limits_server, TRUSTED.value) as ch:
        api = Reapi(ch)
        api.upload(big)
        assert api.write(b"w" * 60_000, upload_id="w").committed_size == 60_000
        code, message = code_of(lambda: api.write(b"x" * 70_000, upload_id="x"))
        assert code is EXHAUSTED and "65,536-byte blob size limit" in message


def test_batches_over_the_callers_batch_limit_are_refused(limits_server: ServerProcess) -> None:
    blobs = [bytes([i]) * 1000 for i in range(5)]  # each under 1K, 5,000 bytes together
    with channel_for(limits_server, LIMITED.value) as ch:
        api = Reapi(ch)
        code, message = code_of(lambda: api.upload(*blobs))
        assert code is EXHAUSTED
        assert message == (
            "BatchUpdateBlobs of 5,000 bytes is over the 4,096-byte batch limit of caller "
            "'limited'; use ByteStream for more"
        )
        api.upload(*blobs[:4])
        read = re_pb2.BatchReadBlobsRequest(digests=[digest(b) for b in blobs])
        code, message = code_of(lambda: api.cas.BatchReadBlobs(read))
        assert code is EXHAUSTED and message.startswith("BatchReadBlobs of 5,000 bytes")
    with channel_for(limits_server, TRUSTED.value) as ch:
        Reapi(ch).upload(*blobs)


def _open_write(
    api: Reapi, upload_id: str
) -> tuple[grpc.Future[bs_pb2.WriteResponse], queue.Queue[object]]:
    """A Write that sends its first chunk and then waits (holding a stream) until told."""
    data = b"held" * 100
    d = digest(data)
    name = f"uploads/{upload_id}/blobs/{d.hash}/{d.size_bytes}"
    release: queue.Queue[object] = queue.Queue()

    def requests() -> Iterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=name, write_offset=0, data=data[:10])
        release.get(timeout=30)
        yield bs_pb2.WriteRequest(write_offset=10, data=data[10:], finish_write=True)

    return api.bytestream.Write.future(requests(), timeout=30), release


def test_calls_in_flight_are_limited_per_caller(limits_server: ServerProcess) -> None:
    with channel_for(limits_server, LIMITED.value) as ch:
        api = Reapi(ch)
        held: dict[int, tuple[grpc.Future[bs_pb2.WriteResponse], queue.Queue[object]]] = {}
        try:
            # Hold two streams open, then probe. A probe can reach the server before a
            # held stream does and take its place (that stream is then refused), so a
            # held stream that ended is opened again until both are in and a probe is
            # the one refused.
            for attempt in range(100):
                for i in range(2):
                    if i not in held or held[i][0].done():
                        held[i] = _open_write(api, f"held-{i}-{attempt}")
                time.sleep(0.05)
                code, message = code_of_or_ok(lambda: api.missing(digest(b"probe")))
                if code is EXHAUSTED and not any(f.done() for f, _ in held.values()):
                    break
            assert code is EXHAUSTED
            assert message == "caller 'limited' has 2 calls in flight already; the limit is 2"
            # Another caller is not affected.
            with channel_for(limits_server, TRUSTED.value) as other:
                assert Reapi(other).missing(digest(b"")) == []
        finally:
            for _, release in held.values():
                release.put(None)
        for future, _ in held.values():
            assert future.result().committed_size == 400
        # The streams are over: the caller may call again.
        assert api.missing(digest(b"held" * 100)) == []


def code_of_or_ok(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_callers_without_a_stream_limit_are_not_counted() -> None:
    """No count to keep, and no peer address to look up, on every call of such a caller."""
    enforcer = LimitEnforcer()
    call = Call("/build.bazel.remote.execution.v2.ActionCache/GetActionResult", None, "id")  # type: ignore[arg-type]
    call.caller = OPEN
    assert OPEN.limits.max_streams is None
    enforcer.begin(call)
    assert not enforcer.in_flight
    enforcer.end(call)
    assert not enforcer.in_flight
