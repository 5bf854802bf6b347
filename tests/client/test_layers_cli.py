"""`slipstream cache save|restore`: exit codes, one-line messages, the summary."""

from __future__ import annotations

import pathlib

import grpc
import pytest

from benchmarks import bench_layers
from slipstream.cli import main
from tests.server_process import ServerProcess, free_port


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
