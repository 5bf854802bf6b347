"""Run `slipstream serve` as a real process for tests: start, stop, kill, restart."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import grpc


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_LISTENING = re.compile(r"serving the REAPI v2 cache on (\S+)")


class ServerProcess:
    """A `slipstream serve` subprocess on a free loopback port."""

    def __init__(
        self,
        storage: pathlib.Path | str,
        extra_args: Sequence[str] = (),
        port: int = 0,
        *,
        env: Mapping[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,  # for a server with TLS
        cwd: pathlib.Path | str | None = None,  # a checkout's root: its code serves
    ) -> None:
        self.storage = storage
        self.env = dict(env or {})
        self.cwd = cwd
        self.credentials = credentials
        self.extra_args = list(extra_args)
        self.port = port
        self.address = ""
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    def start(self, timeout: float = 30.0) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "slipstream.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--storage",
            str(self.storage),
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=self.cwd
        )
        found = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = _LISTENING.search(line)
                if m and not found.is_set():
                    self.address = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout) or not self.address:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.output))
        # Reuse the same port on restart, so clients can reconnect.
        self.port = int(self.address.rsplit(":", 1)[1])
        grpc.channel_ready_future(self.channel()).result(timeout=timeout)
        return self

    def channel(self) -> grpc.Channel:
        """A channel to the server (TLS with `credentials` if given)."""
        if self.credentials is not None:
            return grpc.secure_channel(self.address, self.credentials)
        return grpc.insecure_channel(self.address)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Start server, and stop it (or kill it if it will not stop) afterwards."""
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.kill()


def output_line(server: ServerProcess, text: str, timeout: float = 10.0) -> str:
    """The first line of the server's output containing text, waiting for it to arrive."""
    deadline = time.monotonic() + timeout
    while True:
        for line in list(server.output):
            if text in line:
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in server output:\n" + "".join(server.output))
        time.sleep(0.02)


def http_url(server: ServerProcess) -> str:
    """The URL of the server's HTTP endpoint (`serve --http-listen`), as it says at start."""
    line = output_line(server, "serving the HTTP cache")
    return line.rsplit(" on ", 1)[1].strip()


def serve_exit(
    *args: str,
    timeout: float = 60,
    cwd: pathlib.Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`slipstream serve ARGS` that is expected to stop by itself (a refused setting),
    with its output."""
    return subprocess.run(
        [sys.executable, "-m", "slipstream.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )
