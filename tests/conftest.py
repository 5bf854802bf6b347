"""Fixtures shared by all tests: a real cache server on a real socket."""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import grpc
import pytest

from slipstream.cache_server.storage.disk import RAM_FILESYSTEMS, filesystem_type
from tests.e2e.bazel_harness import Bazel, write_workspace
from tests.support.server_process import ServerProcess, running

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 32 << 20),
    ("grpc.max_send_message_length", 32 << 20),
]


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[ServerProcess]:
    """A fresh `slipstream serve` on the disk store, on a free port."""
    with running(ServerProcess(tmp_path / "store")) as proc:
        yield proc


@pytest.fixture(params=["disk", "disk-tmpfs", "memory"])
def any_store_server(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> Iterator[ServerProcess]:
    """A fresh `slipstream serve` on each local store in turn: the disk store (its calls
    on worker threads), the disk store on tmpfs and the memory store (their small calls
    served in place on the event loop)."""
    storage: str | pathlib.Path = "memory://"
    if request.param == "disk":
        storage = tmp_path / "store"
    elif request.param == "disk-tmpfs":
        storage = request.getfixturevalue("tmpfs_path") / "store"
    with running(ServerProcess(storage)) as proc:
        yield proc


@pytest.fixture
def tmpfs_path() -> Iterator[pathlib.Path]:
    """A temporary directory on /dev/shm; skips, saying why, where that is not a tmpfs."""
    if filesystem_type(pathlib.Path("/dev/shm")) not in RAM_FILESYSTEMS:
        print("SKIPPED: /dev/shm is not a tmpfs here")
        pytest.skip("/dev/shm is not a tmpfs here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        yield pathlib.Path(tmp)


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address, options=_CHANNEL_OPTIONS) as ch:
        yield ch


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for a whole module, for property tests that make many calls."""
    with running(ServerProcess(tmp_path_factory.mktemp("store"))) as proc:
        yield proc


@pytest.fixture(scope="module")
def shared_channel(shared_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shared_server.address, options=_CHANNEL_OPTIONS) as ch:
        yield ch


@pytest.fixture
def bazel(tmp_path: pathlib.Path) -> Iterator[Bazel]:
    """A small Bazel workspace (tests/e2e/bazel_harness.py), its server shut down afterwards.

    Skips, saying why, only when there is no `bazel` (CI installs bazel-bootstrap).
    """
    path = shutil.which("bazel")
    if path is None:
        print("SKIPPED: no `bazel` on PATH (CI installs Debian's bazel-bootstrap)")
        pytest.skip("no `bazel` on PATH (CI installs Debian's bazel-bootstrap)")
    workspace = write_workspace(tmp_path, bazel=path)
    try:
        yield workspace
    finally:
        workspace.shutdown()
