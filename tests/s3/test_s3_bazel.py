"""End-to-end: the real Bazel against `slipstream serve` over S3, with and without the tier.

Cold build, expunge, warm build through a second replica over the same bucket:
every action is a remote cache hit and every output byte-identical.
"""

from __future__ import annotations

import pathlib

import pytest

from tests.e2e.bazel_harness import Bazel
from tests.support.moto import server_args
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.bazel


@pytest.mark.parametrize("tier", [False, True], ids=["s3", "disk+s3"])
def test_bazel_warm_build_over_s3_is_all_hits(
    tier: bool, bucket: str, moto_url: str, tmp_path: pathlib.Path, bazel: Bazel
) -> None:
    procs = []

    def start(name: str) -> ServerProcess:
        extra = ["--cache-dir", str(tmp_path / name), "--cache-size", "256M"] if tier else []
        proc = ServerProcess(f"s3://{bucket}", server_args(moto_url, *extra)).start()
        procs.append(proc)
        return proc

    try:
        first_server = start("tier-a")
        first = bazel.build(remote_cache=f"grpc://{first_server.address}")
        assert not first.warnings, first.warnings
        assert first.processes.executed >= 7, first.output
        outputs = bazel.output_hashes()
        bazel.clean_expunge()
        second_server = start("tier-b")  # another replica: everything comes from S3
        second = bazel.build(remote_cache=f"grpc://{second_server.address}")
        assert not second.warnings, second.warnings
        assert second.processes.executed == 0, second.output
        assert second.processes.remote_hits == first.processes.executed
        assert bazel.output_hashes() == outputs
    finally:
        for proc in procs:
            try:
                proc.stop()
            finally:
                proc.kill()
