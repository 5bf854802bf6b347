"""moto in server mode on loopback: the S3-compatible endpoint tests and benchmarks use."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from tests.support.server_process import free_port

# Dummy credentials, found through boto3's standard chain (the environment).
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",  # never look for an instance role off this machine
}


@contextlib.contextmanager
def moto_server(timeout: float = 30.0) -> Iterator[str]:
    """Start `moto_server` on a free 127.0.0.1 port; yields its URL, stops it afterwards.

    Raises RuntimeError when it does not answer within timeout (or is not installed).
    """
    port = free_port()
    try:
        proc = subprocess.Popen(
            ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **AWS_ENV},
        )
    except FileNotFoundError:
        raise RuntimeError("moto_server not found (pip install 'moto[server]')") from None
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
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


def moto_client(endpoint: str, connections: int = 10) -> Any:
    """A boto3 S3 client of the endpoint, with the dummy credentials and the checksum
    settings of the cache server's own S3 client."""
    import boto3
    import botocore.config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        config=botocore.config.Config(
            max_pool_connections=connections,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def make_buckets(endpoint: str, *names: str) -> None:
    client = moto_client(endpoint)
    for name in names:
        client.create_bucket(Bucket=name)


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
