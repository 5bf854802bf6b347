"""A full disk is RESOURCE_EXHAUSTED (gRPC) or 507 (HTTP) saying so, on every kind of
write; it leaves no temp files, harms nothing stored, and passes once there is space
again (issue 19, item 8). On a small tmpfs this test mounts (it needs root)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import split_pb2
from slipstream.protos import split_pb2_grpc as split_grpc
from tests.http.helpers import HttpClient, http_server
from tests.support.reapi import Reapi, digest, rpc_error
from tests.support.server_process import ServerProcess, http_url, running


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 2 MiB tmpfs mounted for the test; skips, saying why, where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(path: pathlib.Path) -> None:
    """Write path until the filesystem has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (64 << 10, 4096, 1):
            try:
                while os.write(fd, b"f" * size):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)


def _exhausted(code: int | grpc.StatusCode, message: str) -> None:
    value = code.value[0] if isinstance(code, grpc.StatusCode) else code
    assert value == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], (code, message)
    assert message.startswith("disk full"), message


def _writes(channel: grpc.Channel, http: HttpClient, tag: bytes) -> dict[str, object]:
    """One write of each kind; what each answered."""
    api = Reapi(channel)
    blob = b"batch " + tag * 20_000
    batch = api.cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest(blob), data=blob)]
        )
    ).responses[0]
    streamed = b"stream " + tag * 300_000
    try:
        answers: dict[str, object] = {"stream": api.write(streamed, upload_id=tag.decode())}
    except grpc.RpcError as exc:
        answers = {"stream": (exc.code(), exc.details())}
    answers["batch"] = (batch.status.code, batch.status.message)
    action = digest(b"action " + tag)
    result = re_pb2.ActionResult(exit_code=3)
    try:
        answers["ac"] = api.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result)
        )
    except grpc.RpcError as exc:
        answers["ac"] = (exc.code(), exc.details())
    http_blob = b"http " + tag * 50_000
    answers["http cas"] = http.put(f"/cas/{hashlib.sha256(http_blob).hexdigest()}", http_blob)
    http_action = hashlib.sha256(b"http action " + tag).hexdigest()
    answers["http ac"] = http.put(f"/ac/{http_action}", result.SerializeToString())
    ccache_key = "c" + hashlib.sha256(b"ccache " + tag).hexdigest()[:32]  # ccache's shape
    answers["ccache"] = http.put(f"/ccache/team/{ccache_key}", b"ccache entry " + tag * 3000)
    timings = split_pb2.UploadTimingsRequest(
        suite="suite",
        run_id=f"run-{tag.decode()}",
        timings=[split_pb2.TestTiming(test_id=f"t{i}", seconds=1.0) for i in range(200)],
    )
    try:
        answers["timings"] = split_grpc.SplitStub(channel).UploadTimings(iter([timings]))
    except grpc.RpcError as exc:
        answers["timings"] = (exc.code(), exc.details())
    return answers


def test_disk_full_is_resource_exhausted_and_recovers(small_disk: pathlib.Path) -> None:
    storage = small_disk / "store"
    server: ServerProcess = http_server(storage)
    with running(server):
        api = Reapi(server.channel())
        kept = [os.urandom(10_000) for _ in range(3)]
        kept_digests = api.upload(*kept)
        filler = small_disk / "filler"
        _fill(filler)
        with HttpClient(http_url(server)) as http:
            full = _writes(server.channel(), http, b"a")
            for kind in ("batch", "stream", "ac", "timings"):
                answer = full[kind]
                assert isinstance(answer, tuple), (kind, answer)
                _exhausted(*answer)
            for kind in ("http cas", "http ac", "ccache"):
                reply = full[kind]
                assert reply.status == 507, (kind, reply)  # type: ignore[attr-defined]
                assert reply.text.startswith("disk full"), reply  # type: ignore[attr-defined]
            assert list((storage / "tmp").iterdir()) == []  # no temp file left behind
            for data, d in zip(kept, kept_digests, strict=True):
                assert api.read(d) == data

            filler.unlink()
        with HttpClient(http_url(server)) as http:
            recovered = _writes(server.channel(), http, b"b")
            assert recovered["batch"] == (0, "")
            assert not isinstance(recovered["stream"], tuple), recovered["stream"]
            assert not isinstance(recovered["ac"], tuple), recovered["ac"]
            assert recovered["http cas"].status == 200  # type: ignore[attr-defined]
            assert recovered["http ac"].status == 200  # type: ignore[attr-defined]
            assert recovered["ccache"].status == 200  # type: ignore[attr-defined]
            assert not isinstance(recovered["timings"], tuple), recovered["timings"]
        missing = rpc_error(lambda: api.read(digest(b"never stored")))
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        server.stop()
    log = "".join(server.output)
    assert "Traceback" not in log, log
