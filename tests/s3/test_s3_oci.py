"""End-to-end: the OCI registry over S3 (moto): an image pushed with skopeo through one
replica is pulled through another over the same bucket, every blob verified, its
tags listed there too (manifests and tags are records in the shared store)."""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.http.helpers import http_server
from tests.support.moto import server_args
from tests.support.oci import SKOPEO, random_layers, sha256, skopeo, write_image
from tests.support.server_process import http_url, running

pytestmark = pytest.mark.skipif(
    SKOPEO is None, reason="needs skopeo (CI installs Debian's skopeo, see .ci/setup)"
)


def test_an_image_pushed_through_one_replica_pulls_through_another(
    bucket: str, moto_url: str, tmp_path: pathlib.Path
) -> None:
    image = write_image(tmp_path / "image", random_layers(11, [1_500_000, 2_000, 10]))
    store = f"s3://{bucket}"
    with (
        running(http_server(store, server_args(moto_url))) as first,
        running(http_server(store, server_args(moto_url))) as second,
    ):
        pushed_to = http_url(first).removeprefix("http://")
        pulled_from = http_url(second).removeprefix("http://")
        skopeo(
            "copy",
            "--dest-tls-verify=false",
            f"oci:{image.layout}:latest",
            f"docker://{pushed_to}/team/app:v1",
        )
        dest = tmp_path / "pulled"
        skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://{pulled_from}/team/app:v1",
            f"oci:{dest}:v1",
        )
        pulled = {p.name: p.read_bytes() for p in (dest / "blobs" / "sha256").iterdir()}
        assert all(sha256(data) == name for name, data in pulled.items())
        assert {f"sha256:{n}": d for n, d in pulled.items()}.items() >= image.blobs().items()
        assert pulled[sha256(image.manifest)] == image.manifest
        tags = skopeo("list-tags", "--tls-verify=false", f"docker://{pulled_from}/team/app")
        assert json.loads(tags.stdout)["Tags"] == ["v1"]
