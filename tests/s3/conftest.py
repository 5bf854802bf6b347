"""Fixtures for the S3 tests: moto in server mode on loopback, a fault proxy, buckets."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from slipstream.cache_server.storage.base import Store
from slipstream.cache_server.storage.existence_cache import ExistenceCache
from slipstream.cache_server.storage.s3 import S3Config, S3Store
from tests.support.fault_proxy import FaultProxy
from tests.support.moto import AWS_ENV, moto_server


@pytest.fixture(scope="session", autouse=True)
def aws_env() -> Iterator[None]:
    """Dummy credentials through the standard chain (the environment), for us and our servers."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def moto_url(aws_env: None) -> Iterator[str]:
    with moto_server() as url:
        yield url


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(moto_url: str) -> str:
    name = f"slipstream-{uuid.uuid4().hex[:12]}"
    s3_client(moto_url).create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(moto_url: str) -> Iterator[FaultProxy]:
    p = FaultProxy(int(moto_url.rsplit(":", 1)[1])).start()
    try:
        yield p
    finally:
        p.close()


@dataclass
class StoreFactory:
    moto_url: str
    bucket: str

    def __call__(self, endpoint: str | None = None, **kw: Any) -> Store:
        """An S3 store composed as the server composes it (behind an existence cache)."""
        config = self.config(endpoint, **kw)
        return ExistenceCache(
            S3Store(config), config.known_present_entries, config.known_present_ttl
        )

    def raw(self, endpoint: str | None = None, **kw: Any) -> S3Store:
        """The bare S3 store, for what only it has (abort_stale_uploads)."""
        return S3Store(self.config(endpoint, **kw))

    def config(self, endpoint: str | None = None, **kw: Any) -> S3Config:
        kw.setdefault("timeout", 2.0)
        kw.setdefault("max_attempts", 4)
        return S3Config(
            bucket=self.bucket,
            prefix=kw.pop("prefix", "cache/"),
            endpoint_url=endpoint or self.moto_url,
            region="us-east-1",
            addressing="path",
            **kw,
        )


@pytest.fixture
def make_store(moto_url: str, bucket: str) -> Iterator[StoreFactory]:
    factory = StoreFactory(moto_url, bucket)
    yield factory


@pytest.fixture
def store(make_store: StoreFactory) -> Iterator[Store]:
    s = make_store()
    try:
        yield s
    finally:
        s.close()
