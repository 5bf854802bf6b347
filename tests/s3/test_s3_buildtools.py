"""End-to-end over S3 (moto on loopback): turbo, nx and sccache fill the cache through one
replica and a fresh runner gets everything through another over the same bucket (the
second with a local disk tier in front of S3)."""

from __future__ import annotations

import pathlib

import pytest

from tests.http.test_sccache import FILES, GCC, SCCACHE, Runner, c_count
from tests.support.js_tools import (
    NX_JSON,
    PACKAGES,
    TURBO_JSON,
    Nx,
    Turbo,
    clone,
    outputs,
    write_monorepo,
)
from tests.support.moto import server_args
from tests.support.server_process import ServerProcess, http_url, running


def replica(bucket: str, moto_url: str, *extra: str) -> ServerProcess:
    args = server_args(moto_url, "--http-listen", "127.0.0.1:0", *extra)
    return ServerProcess(f"s3://{bucket}/ci", args)


def test_turbo_and_nx_through_two_replicas(
    bucket: str, moto_url: str, tmp_path: pathlib.Path
) -> None:
    origin = write_monorepo(tmp_path / "origin", {"turbo.json": TURBO_JSON, "nx.json": NX_JSON})
    tier = ["--cache-dir", str(tmp_path / "tier"), "--cache-size", "64M"]
    with (
        running(replica(bucket, moto_url)) as one,
        running(replica(bucket, moto_url, *tier)) as two,
    ):
        url_one, url_two = http_url(one), http_url(two)
        _, cached = Turbo(clone(origin, tmp_path / "t1"), url_one, "tok", "web").build()
        assert cached == 0
        out, cached = Turbo(clone(origin, tmp_path / "t2"), url_two, "tok", "web").build()
        assert cached == 3 and ">>> FULL TURBO" in out, out
        assert outputs(tmp_path / "t2") == outputs(tmp_path / "t1")

        _, remote = Nx(clone(origin, tmp_path / "n1"), url_one, "tok").build()
        assert remote == set()
        out, remote = Nx(clone(origin, tmp_path / "n2"), url_two, "tok").build()
        assert remote == set(PACKAGES), out
        assert outputs(tmp_path / "n2") == outputs(tmp_path / "n1")


@pytest.mark.skipif(SCCACHE is None or GCC is None, reason="needs sccache and gcc")
def test_sccache_through_two_replicas(bucket: str, moto_url: str, tmp_path: pathlib.Path) -> None:
    with running(replica(bucket, moto_url)) as one, running(replica(bucket, moto_url)) as two:
        first, objects = Runner(tmp_path / "one", f"{http_url(one)}/sccache/s3", None).build()
        assert c_count(first, "cache_misses") == FILES, first
        second, again = Runner(tmp_path / "two", f"{http_url(two)}/sccache/s3", None).build()
        assert c_count(second, "cache_hits") == FILES, second
        assert again == objects
