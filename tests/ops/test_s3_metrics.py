"""S3 request counters in the metrics of a server over S3 (moto on loopback)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from slipstream.cache_server.metrics import StoreCollector
from slipstream.cache_server.storage.base import StoreStats
from tests.ops.helpers import channel_for, metrics_url, scrape
from tests.reapi import Reapi
from tests.s3.conftest import aws_env, bucket, moto_url, server_args  # noqa: F401 (fixtures)
from tests.server_process import ServerProcess, running


def test_s3_requests_are_counted(bucket: str, moto_url: str) -> None:  # noqa: F811
    args = server_args(moto_url, "--metrics-listen", "127.0.0.1:0")
    with running(ServerProcess(f"s3://{bucket}/ops", args)) as server:
        url = metrics_url(server)
        before = scrape(url)
        with channel_for(server) as ch:
            api = Reapi(ch)
            (d,) = api.upload(b"to S3 and back")
            assert api.read(d) == b"to S3 and back"
        after = scrape(url)

    def requests(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
        return sum(v for (name, _), v in samples.items() if name == "slipstream_s3_requests_total")

    assert requests(after) - requests(before) >= 2  # at least a write and a read
    operations = {
        dict(labels)["operation"]
        for (name, labels) in after
        if name == "slipstream_s3_requests_total"
    }
    assert "PutObject" in operations or "CreateMultipartUpload" in operations
    assert "GetObject" in operations


class _FakeS3:
    """What the collector asks of an S3 store: request and (when it has them) error counts."""

    def request_counts(self) -> dict[str, int]:
        return {"HeadObject": 7, "PutObject": 2}

    def error_counts(self) -> dict[str, int]:
        return {"timeout": 1}


class _Tiered:
    """A disk tier in front of S3: stats from the disk, S3 counts from `shared`."""

    shared = _FakeS3()

    def stats(self) -> StoreStats:
        return StoreStats(blobs=3, bytes_used=300, max_bytes=None, evictions=4)


def test_collector_reads_s3_counts_through_a_tier() -> None:
    registry = CollectorRegistry()
    registry.register(StoreCollector(_Tiered()))  # type: ignore[arg-type]
    value = registry.get_sample_value
    assert value("slipstream_s3_requests_total", {"operation": "HeadObject"}) == 7
    assert value("slipstream_s3_errors_total", {"kind": "timeout"}) == 1
    assert value("slipstream_store_evictions_total") == 4
    assert value("slipstream_store_bytes") == 300
    assert value("slipstream_store_max_bytes") is None  # no bound, no gauge
