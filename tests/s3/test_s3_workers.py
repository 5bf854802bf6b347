"""`serve --workers 2` over S3 with a disk tier: the tier's one bound holds across the
workers, and what one worker wrote every other reads (from the tier or the bucket)."""

from __future__ import annotations

import os
import pathlib
import time

import grpc

from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.http.helpers import HttpClient, Reply, http_server, served_by, sha256
from tests.support.moto import server_args
from tests.support.reapi import Reapi
from tests.support.server_process import ServerProcess, http_url, running


def test_workers_share_the_disk_tier_and_its_bound(
    bucket: str, moto_url: str, tmp_path: pathlib.Path
) -> None:
    tier = tmp_path / "tier"
    bound = 100_000
    args = server_args(moto_url, "--cache-dir", str(tier), "--cache-size", str(bound))
    with running(ServerProcess(f"s3://{bucket}/ci", [*args, "--workers", "2"])) as server:
        assert "disk store at" in "".join(server.output)
        channels = [
            grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(8)
        ]
        try:
            apis = [Reapi(channel) for channel in channels]
            blobs = [os.urandom(20_000) for _ in range(20)]
            digests = [d for i, blob in enumerate(blobs) for d in apis[i % 8].upload(blob)]
            for api in apis:
                assert api.missing(*digests) == []
                response = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))
                assert [r.data for r in response.responses] == blobs
        finally:
            for channel in channels:
                channel.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            used = sum(p.stat().st_size for p in (tier / "cas").rglob("*") if p.is_file())
            if used <= bound:
                break
            time.sleep(0.05)
        assert 0 < used <= bound


def test_workers_over_s3_alone_share_upload_sessions_in_a_directory_of_their_own(
    bucket: str, moto_url: str, tmp_path: pathlib.Path
) -> None:
    """No disk directory to put them in: the supervisor makes one (in TMPDIR) for the
    workers' OCI upload sessions, and removes it when it stops."""
    temp = tmp_path / "temp"
    temp.mkdir()
    args = server_args(moto_url, "--workers", "2", "--log-level", "INFO", "--log-format", "json")
    server = http_server(f"s3://{bucket}/ci", args)
    server.env["TMPDIR"] = str(temp)
    with running(server):
        [sessions] = temp.glob("slipstream-oci-sessions-*")
        url = http_url(server)

        def request(method: str, path: str, body: bytes, **headers: str) -> Reply:
            with HttpClient(url) as http:  # a connection each: spread over the workers
                return http.request(method, path, body, headers)

        opened = request("POST", "/v2/team/app/blobs/uploads/", b"")
        location, upload_id = opened.headers["Location"], opened.headers["Docker-Upload-UUID"]
        data = b""
        while len({pid for pid, _ in served_by(server, upload_id, len(data) // 100_000)}) < 2:
            assert len(data) < 40 * 100_000, "every connection reached one worker"
            chunk = os.urandom(100_000)
            content_range = f"{len(data)}-{len(data) + len(chunk) - 1}"
            reply = request("PATCH", location, chunk, **{"Content-Range": content_range})
            data += chunk
            assert reply.status == 202 and reply.headers["Range"] == f"0-{len(data) - 1}", reply
        assert len(list(sessions.iterdir())) == 1
        reply = request("PUT", f"{location}?digest=sha256:{sha256(data)}", b"")
        assert reply.status == 201, reply
        assert list(sessions.iterdir()) == []
        for _ in range(4):
            assert request("GET", f"/v2/team/app/blobs/sha256:{sha256(data)}", b"").body == data
    assert not sessions.exists()
