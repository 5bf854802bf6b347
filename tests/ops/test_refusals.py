"""Settings that must stop `slipstream serve` at start: exit 2 and one line on stderr."""

from __future__ import annotations

import pathlib
import subprocess
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, free_port, running, serve_exit


def assert_refused(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("slipstream serve: error: ")
    assert message in done.stderr, done.stderr


def test_a_port_another_server_holds_stops_the_second_server(tmp_path: pathlib.Path) -> None:
    http, metrics, health = free_port(), free_port(), free_port()
    first = ServerProcess(
        "memory://",
        [
            "--http-listen",
            f"127.0.0.1:{http}",
            "--metrics-listen",
            f"127.0.0.1:{metrics}",
            "--health-listen",
            f"127.0.0.1:{health}",
        ],
    )
    with running(first):
        with grpc.insecure_channel(first.address) as ch:
            Reapi(ch).upload(b"held")
        held = f"127.0.0.1:{first.port}"
        cases = {
            ("--listen", held): f"cannot listen on {held}",
            ("--listen", "127.0.0.1:0", "--http-listen", f"127.0.0.1:{http}"): "cannot serve HTTP",
            ("--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{metrics}"): (
                "cannot serve metrics"
            ),
            ("--listen", "127.0.0.1:0", "--health-listen", f"127.0.0.1:{health}"): (
                "cannot serve health checks"
            ),
        }
        for args, message in cases.items():
            assert_refused(serve_exit("--storage", "memory://", *args), message)
        # The first server still has every connection, and its blob.
        for _ in range(20):
            with grpc.insecure_channel(first.address) as ch:
                assert Reapi(ch).missing(digest(b"held")) == []
        with grpc.insecure_channel(f"127.0.0.1:{health}") as ch:
            answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            assert r.status == 200
        assert first.proc is not None and first.proc.poll() is None


def test_listen_ports_out_of_range_are_refused() -> None:
    for flag in ("--listen", "--http-listen", "--metrics-listen", "--health-listen"):
        done = serve_exit("--storage", "memory://", flag, "127.0.0.1:99999")
        assert_refused(done, f"{flag} '127.0.0.1:99999': port 99999 is not in 0-65535")


def test_a_storage_url_of_an_unknown_scheme_is_refused(tmp_path: pathlib.Path) -> None:
    for url in ("ftp://x", "gs://bucket", "file:///tmp/x"):
        done = serve_exit("--storage", url, cwd=tmp_path)
        assert_refused(done, f"--storage {url!r}: unknown scheme")
    assert list(tmp_path.iterdir()) == []  # no ./ftp:/x directory made


def test_a_storage_directory_that_is_a_file_is_refused(tmp_path: pathlib.Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a store")
    for path, message in (
        (a_file, f"--storage {a_file} is not a directory"),
        (a_file / "x", f"--storage {a_file / 'x'}: a part of that path is a file"),
    ):
        assert_refused(serve_exit("--storage", str(path), "--listen", "127.0.0.1:0"), message)
