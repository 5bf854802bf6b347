"""Fixtures for the S3 tests: moto in server mode on loopback, a fault proxy, buckets."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from cache_server.storage.s3 import S3Config, S3Store
from tests.s3.fault_proxy import FaultProxy

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def aws_env() -> Iterator[None]:
    """Dummy credentials through the standard chain (the environment), for us and our servers."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def moto_url(aws_env: None) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/data.json", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


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

    def __call__(self, endpoint: str | None = None, **kw: Any) -> S3Store:
        kw.setdefault("timeout", 2.0)
        kw.setdefault("max_attempts", 4)
        config = S3Config(
            bucket=self.bucket,
            prefix=kw.pop("prefix", "cache/"),
            endpoint_url=endpoint or self.moto_url,
            region="us-east-1",
            addressing="path",
            **kw,
        )
        return S3Store(config)


@pytest.fixture
def make_store(moto_url: str, bucket: str) -> Iterator[StoreFactory]:
    factory = StoreFactory(moto_url, bucket)
    yield factory


@pytest.fixture
def store(make_store: StoreFactory) -> Iterator[S3Store]:
    s = make_store()
    try:
        yield s
    finally:
        s.close()


def server_args(endpoint: str, *extra: str) -> list[str]:
    """Flags for a `slipstream serve` over the fixture's S3 endpoint."""
    return [
        "--s3-endpoint",
        endpoint,
        "--s3-region",
        "us-east-1",
        "--s3-addressing",
        "path",
        *extra,
    ]
