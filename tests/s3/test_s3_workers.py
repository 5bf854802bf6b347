"""`serve --workers 2` over S3 with a disk tier: the tier's one bound holds across the
workers, and what one worker wrote every other reads (from the tier or the bucket)."""

from __future__ import annotations

import os
import pathlib
import time

import grpc

from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.support.moto import server_args
from tests.support.reapi import Reapi
from tests.support.server_process import ServerProcess, running


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
