"""Upload sessions, both homes (services/oci_sessions.py): bounded per caller, idle ones
cleaned up with their bytes, verified when finished. The shared home is driven by two
SharedSessions on one directory, as two workers of a server would."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.cache_server.services.common import Backend, HttpError
from slipstream.cache_server.services.oci_sessions import (
    MAX_SESSIONS_PER_CALLER,
    MemorySessions,
    SharedSessions,
    UploadSessions,
    clear_shared_sessions,
)
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.core.digests import BlobId

T = TypeVar("T")
Kinds = Callable[[float], UploadSessions]  # idle seconds -> the sessions of a "worker"


@pytest.fixture
def backend(tmp_path: pathlib.Path) -> Iterator[Backend]:
    with ThreadPoolExecutor(4) as executor:
        yield Backend(DiskStore(tmp_path / "store", sync=False), executor)


@pytest.fixture(params=["memory", "shared"])
def kind(request: pytest.FixtureRequest, backend: Backend, tmp_path: pathlib.Path) -> Kinds:
    """Sessions of each home; for the shared one, each call is another worker on the one
    directory (the memory home has one process only: the same sessions each call)."""
    if request.param == "memory":
        sessions: dict[float, MemorySessions] = {}
        return lambda idle: sessions.setdefault(idle, MemorySessions(backend, idle))
    directory = tmp_path / "store" / "tmp" / "oci-sessions"
    clear_shared_sessions(directory)
    return lambda idle: SharedSessions(backend, idle, directory)


def run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


def unknown(sessions: UploadSessions, upload_id: str, repository: str, owner: str) -> None:
    with pytest.raises(HttpError) as refused:
        run(sessions.status(upload_id, repository, owner))
    assert refused.value.status == 404 and refused.value.code == "BLOB_UPLOAD_UNKNOWN"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_idle_session_is_cleaned_up_with_its_bytes(
    kind: Kinds, backend: Backend, tmp_path: pathlib.Path
) -> None:
    first, second = kind(0.05), kind(0.05)

    async def open_and_fill() -> str:
        upload_id = await first.open("team/app", "ci")
        async with first.hold(upload_id, "team/app", "ci") as session:
            await session.append(b"x" * 200_000)  # spilled to a file
        return upload_id

    idle = run(open_and_fill())
    time.sleep(0.3)
    busy = run(second.open("team/app", "ci"))  # ends the idle one, wherever it is
    assert run(second.status(busy, "team/app", "ci")) == 0
    unknown(first, idle, "team/app", "ci")
    unknown(second, idle, "team/app", "ci")
    if isinstance(first, SharedSessions):
        assert [p.name.split(".")[0] for p in first.directory.iterdir()] == [busy]


def test_open_ends_the_callers_oldest_sessions_past_the_bound(kind: Kinds) -> None:
    workers = [kind(60.0), kind(60.0)]
    opened = [run(workers[i % 2].open("r", "ci")) for i in range(MAX_SESSIONS_PER_CALLER)]
    other = run(workers[0].open("r", "someone-else"))
    run(workers[1].open("r", "ci"))
    for sessions in workers:
        unknown(sessions, opened[0], "r", "ci")
        assert run(sessions.status(opened[1], "r", "ci")) == 0  # type: ignore[misc]
        assert run(sessions.status(other, "r", "someone-else")) == 0  # type: ignore[misc]


def test_a_session_is_only_its_owners_in_its_repository(kind: Kinds) -> None:
    sessions = kind(60.0)
    upload_id = run(sessions.open("team/app", "ci"))
    unknown(sessions, upload_id, "team/app", "someone-else")
    unknown(sessions, upload_id, "team/other", "ci")
    unknown(sessions, "0" * 32, "team/app", "ci")


def test_a_session_taken_by_turns_is_finished_by_another_worker(
    kind: Kinds, backend: Backend
) -> None:
    first, second = kind(60.0), kind(60.0)
    data = os.urandom(3 << 20)
    pieces = [data[i : i + 700_000] for i in range(0, len(data), 700_000)]

    async def upload() -> None:
        upload_id = await first.open("team/app", "ci")
        for i, piece in enumerate(pieces):
            async with (first, second)[i % 2].hold(upload_id, "team/app", "ci") as session:
                await session.append(piece)
        assert await first.status(upload_id, "team/app", "ci") == len(data)
        async with second.hold(upload_id, "team/app", "ci") as session:
            assert session.size == len(data)
            await session.finish(sha256(data))
        with pytest.raises(HttpError):
            await first.status(upload_id, "team/app", "ci")

    run(upload())
    assert backend.store.get_blob(BlobId(sha256(data), len(data))) == data


def test_requests_on_one_session_take_turns_across_workers(kind: Kinds) -> None:
    first, second = kind(60.0), kind(60.0)

    async def race() -> list[str]:
        upload_id = await first.open("r", "ci")
        order: list[str] = []

        async def patch(sessions: UploadSessions, name: str, hold_for: float) -> None:
            async with sessions.hold(upload_id, "r", "ci") as session:
                order.append(f"{name} in")
                await session.append(name.encode())
                await asyncio.sleep(hold_for)
                order.append(f"{name} out")

        holding = asyncio.create_task(patch(first, "a", 0.3))
        await asyncio.sleep(0.05)
        await patch(second, "b", 0)
        await holding
        async with first.hold(upload_id, "r", "ci") as session:
            assert session.size == 2
            await session.end()
        return order

    assert run(race()) == ["a in", "a out", "b in", "b out"]


def test_a_request_waiting_on_a_session_ended_meanwhile_finds_it_over(kind: Kinds) -> None:
    first, second = kind(60.0), kind(60.0)

    async def race() -> None:
        upload_id = await first.open("r", "ci")

        async def cancel() -> None:
            async with first.hold(upload_id, "r", "ci") as session:
                await asyncio.sleep(0.2)
                await session.end()

        cancelling = asyncio.create_task(cancel())
        await asyncio.sleep(0.05)
        with pytest.raises(HttpError) as refused:
            async with second.hold(upload_id, "r", "ci"):
                pass
        assert refused.value.status == 404 and refused.value.code == "BLOB_UPLOAD_UNKNOWN"
        await cancelling

    run(race())


@pytest.mark.parametrize("stored_already", [False, True])
def test_a_wrong_digest_is_refused_and_stores_nothing(
    kind: Kinds, backend: Backend, stored_already: bool
) -> None:
    sessions = kind(60.0)
    claimed = b"what the client says it sent"
    if stored_already:
        backend.store.put_blob(BlobId.of(claimed), claimed)

    async def upload() -> None:
        upload_id = await sessions.open("r", "ci")
        async with sessions.hold(upload_id, "r", "ci") as session:
            await session.append(b"what it sent")
            with pytest.raises(HttpError) as refused:
                await session.finish(sha256(claimed))
        assert refused.value.status == 400 and refused.value.code == "DIGEST_INVALID"
        assert f"hashes to sha256:{sha256(b'what it sent')}" in refused.value.message
        with pytest.raises(HttpError):  # over
            await sessions.status(upload_id, "r", "ci")

    run(upload())
    assert backend.store.find_missing([BlobId.of(b"what it sent")])


@settings(max_examples=30, deadline=None)
@given(
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
    turns=st.lists(st.integers(0, 1), min_size=8, max_size=8),
)
def test_any_split_over_any_workers_stores_exactly_the_bytes_sent(
    data: bytes, cuts: list[int], turns: list[int]
) -> None:
    """However a client cuts its upload into PATCHes, and whichever worker takes each one
    (and the PUT), the blob stored is the bytes sent, in order."""
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    with tempfile.TemporaryDirectory() as temp, ThreadPoolExecutor(2) as executor:
        backend = Backend(DiskStore(pathlib.Path(temp) / "store", sync=False), executor)
        directory = pathlib.Path(temp) / "store" / "tmp" / "oci-sessions"
        clear_shared_sessions(directory)
        workers = [SharedSessions(backend, 60.0, directory) for _ in range(2)]

        async def upload() -> None:
            upload_id = await workers[turns[0]].open("r", "ci")
            for i, piece in enumerate(pieces):
                async with workers[turns[(i + 1) % 8]].hold(upload_id, "r", "ci") as session:
                    await session.append(piece)
            async with workers[turns[-1]].hold(upload_id, "r", "ci") as session:
                await session.finish(sha256(data))

        run(upload())
        assert backend.store.get_blob(BlobId.of(data)) == data
        assert list(directory.iterdir()) == []
