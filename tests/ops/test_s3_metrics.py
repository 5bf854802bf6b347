"""S3 request counters in the metrics of a server over S3 (moto on loopback)."""

from __future__ import annotations

import pathlib

from prometheus_client import CollectorRegistry

from slipstream.cache_server.metrics import StoreCollector
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.existence_cache import ExistenceCache
from slipstream.cache_server.storage.memory import MemoryStore
from slipstream.cache_server.storage.tiered import TieredStore
from slipstream.core.digests import BlobId
from tests.ops.helpers import channel_for, metrics_url, scrape
from tests.s3.conftest import aws_env, bucket, moto_url  # noqa: F401 (fixtures)
from tests.support.moto import server_args
from tests.support.reapi import Reapi
from tests.support.server_process import ServerProcess, running


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


class _CountingStore(MemoryStore):
    """A store that reports requests to a remote backend, as the S3 store does."""

    def request_counts(self) -> dict[str, int]:
        return {"HeadObject": 7, "PutObject": 2}


def test_collector_reads_s3_counts_through_a_tier(tmp_path: pathlib.Path) -> None:
    """Counts come through the wrappers (the disk tier, the existence cache) by the Store
    interface, sizes from the disk tier."""
    shared = ExistenceCache(_CountingStore(), max_entries=10, ttl=60.0)
    tiered = TieredStore(DiskStore(tmp_path / "disk"), shared)
    tiered.put_blob(BlobId.of(b"x" * 300), b"x" * 300)
    registry = CollectorRegistry()
    registry.register(StoreCollector(tiered))
    value = registry.get_sample_value
    assert value("slipstream_s3_requests_total", {"operation": "HeadObject"}) == 7
    disk = tiered.fast.stats()
    assert disk is not None and disk.blobs == 1
    assert value("slipstream_store_bytes") == disk.bytes_used
    assert value("slipstream_store_max_bytes") is None  # no bound, no gauge
    tiered.close()
    registry = CollectorRegistry()
    registry.register(StoreCollector(MemoryStore()))  # a local store: no S3 counts at all
    assert value("slipstream_s3_requests_total", {"operation": "HeadObject"}) == 7
    assert registry.get_sample_value("slipstream_s3_requests_total", {"operation": "x"}) is None
