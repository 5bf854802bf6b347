"""`slipstream cache save|restore`: exit codes, one-line messages, the summary."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import grpc
import pytest

from benchmarks import bench_layers
from slipstream.cli import main
from slipstream.client.cas_client import CasClient
from slipstream.core.digests import BlobId
from tests.support.proc_stats import rss_bytes
from tests.support.server_process import ServerProcess, free_port


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def workdir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    (tmp_path / "deps" / "bin").mkdir(parents=True)
    (tmp_path / "deps" / "bin" / "tool").write_text("#!/bin/sh\n")
    (tmp_path / "deps" / "bin" / "tool").chmod(0o755)
    (tmp_path / "deps" / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_save_restore_and_exit_codes(
    server: ServerProcess, workdir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = ("--server", server.address)
    code, out, _ = run(capsys, "cache", "save", *s, "--key", "deps-1", "deps")
    assert code == 0 and out.startswith("saved 'deps-1': 1 files") and out.count("\n") == 1
    code, out, _ = run(capsys, "cache", "save", *s, "--key", "deps-1", "deps")
    assert code == 0 and "already exists; not saved" in out
    code, out, _ = run(capsys, "cache", "save", *s, "--key", "deps-1", "--overwrite", "deps")
    assert code == 0 and out.startswith("replaced 'deps-1'")

    restore = ("cache", "restore", *s, "--exit-code")
    code, out, _ = run(capsys, *restore, "--key", "deps-1", "--into", "exact")
    assert (code, out.split(";")[0]) == (0, "cache-hit: exact")
    assert (workdir / "exact" / "deps" / "empty").is_dir()
    assert (workdir / "exact" / "deps" / "bin" / "tool").stat().st_mode & 0o111
    code, out, _ = run(capsys, *restore, "--key", "deps-2", "--restore-key", "deps-", "--into", "p")
    assert (code, out.split(";")[0]) == (10, "cache-hit: partial")
    code, out, _ = run(capsys, *restore, "--key", "deps-2", "--into", "m")
    assert (code, out.split(";")[0]) == (11, "cache-hit: miss")
    # Without --exit-code a miss does not fail a CI step.
    code, out, _ = run(capsys, "cache", "restore", *s, "--key", "deps-2", "--into", "m")
    assert code == 0 and out.startswith("cache-hit: miss")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cache", "save", "--key", "", "deps"], "--key must be 1 to 200 characters"),
        (["cache", "save", "--key", "k", "nope"], "nope does not exist"),
        (["cache", "save", "--key", "k", "../x"], "outside the working directory"),
        (["cache", "save", "--key", "k", "--server", "nohost", "deps"], "is not HOST:PORT"),
        (["cache", "restore", "--key", "k", "--restore-key", ""], "--restore-key must be"),
        (["cache", "restore", "--key", "k", "--into", "deps/bin/tool"], "is not a directory"),
        (["cache", "restore", "--key", "k", "--max-entries", "0"], "--max-entries must be"),
        (["cache", "restore", "--key", "k", "--max-depth", "600"], "--max-depth must be 1 to"),
        (["cache", "restore", "--key", "k", "--max-bytes", "lots"], "--max-bytes: 'lots' is not"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    argv: list[str], message: str, workdir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir.parent / "x").touch()
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_unreachable_server_is_one_line(
    workdir: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("SLIPSTREAM_SERVER", f"127.0.0.1:{port}")
    code, _, err = run(capsys, "cache", "restore", "--key", "k")
    assert code == 1 and err.count("\n") == 1
    assert f"cannot reach the server at 127.0.0.1:{port}" in err


def test_unsafe_tree_is_one_line_exit_1(
    server: ServerProcess,
    channel: grpc.Channel,
    workdir: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.client.test_layers import MALICIOUS, _put_raw_tree

    _put_raw_tree(channel, "evil", MALICIOUS["dotdot-file"])
    code, _, err = run(capsys, "cache", "restore", "--server", server.address, "--key", "evil")
    assert code == 1 and err.count("\n") == 1
    assert "refusing to restore an unsafe tree" in err


def test_benchmark_smoke(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_layers.main(["--smoke", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "first_save" in out and (tmp_path / "b.json").exists()


BOMB_RSS_CAP = 400 << 20  # the client is killed above this: before the limits it took 1.7 GiB


def test_tree_bomb_is_refused_early_in_little_memory(
    server: ServerProcess, channel: grpc.Channel, workdir: pathlib.Path
) -> None:
    from slipstream.protos import remote_execution_pb2 as re_pb2
    from tests.client.test_layer_tree import _bomb
    from tests.client.test_layers import _put_raw_tree

    root, blobs = _bomb(levels=6, fan_out=10, files=10)  # 10 million files
    assert sum(map(len, blobs.values())) < 8192
    ordered = sorted(blobs.values(), key=lambda data: BlobId.of(data) == root)
    with CasClient(channel) as cas:
        cas.upload({BlobId.of(b"x"): b"x"})  # the one file content, named 10 million times
    _put_raw_tree(channel, "bomb", [re_pb2.Directory.FromString(d) for d in ordered])
    argv = ["cache", "restore", "--server", server.address, "--key", "bomb", "--into", "out"]
    started = time.monotonic()
    client = subprocess.Popen(
        [sys.executable, "-m", "slipstream.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    while client.poll() is None:
        peak = max(peak, rss_bytes(client.pid))
        if peak > BOMB_RSS_CAP or time.monotonic() - started > 30:
            client.kill()
            client.wait()
            pytest.fail(f"client at {peak >> 20} MiB after {time.monotonic() - started:.0f}s")
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    _, err = client.communicate()
    print(f"tree bomb refused in {elapsed:.1f}s, client peak RSS {peak >> 20} MiB")
    assert client.returncode == 1 and err.count("\n") == 1, err
    assert "unsafe tree: tree has more than 1,000,000 entries" in err
    assert peak < 200 << 20 and elapsed < 20
    assert not (workdir / "out").exists()
