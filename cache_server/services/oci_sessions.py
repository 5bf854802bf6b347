"""OCI blob upload sessions (services/http_oci.py): an upload between the POST that opens
it and the PUT that finishes it, across any number of requests.

One interface, UploadSessions, with two homes, chosen by open_upload_sessions:

- MemorySessions, for one server process: a session's bytes so far in a temporary
  file (in memory while small); its requests take turns on an asyncio lock.
- SharedSessions, for the workers of `serve --workers N`: a session is a file in a
  directory every worker sees (their supervisor's: the disk store's
  tmp/oci-sessions/, or a temporary directory for S3 alone), named
  ID.OWNER.REPOSITORY (the caller's name and the repository hashed) and holding the
  bytes so far, so any worker takes any request of it: the name says whose and
  where, the file's size is the upload's, its mtime the last use. Requests on a
  session take turns on an flock of its file, in one worker or several.

Both: the PUT copies the bytes into the store's writer, which hashes what it takes
and refuses a mismatch, so nothing is visible before it matches its digest and the
bytes are hashed once, at the PUT (a running hash could not cross processes); a blob
stored already is hashed instead. A caller has at most MAX_SESSIONS_PER_CALLER
sessions (a new one ends the caller's least recently used) and the server
MAX_SESSIONS (shared: counted in the directory, so workers opening at the same
moment may pass it by one each); a session with no request for idle_seconds is
ended, with its bytes, by whichever process looks first.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import hashlib
import math
import os
import pathlib
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import IO

from slipstream.cache_server.services.bytestream import UPLOAD_IDLE_TIMEOUT
from slipstream.cache_server.services.common import Backend, HttpError
from slipstream.cache_server.services.http_common import CHUNK
from slipstream.core.digests import BlobId, DigestError

MAX_SESSIONS_PER_CALLER = 64
MAX_SESSIONS = 1024
SESSION_IDLE_SECONDS = UPLOAD_IDLE_TIMEOUT  # the default of --upload-idle-timeout
# What a session keeps in memory before its bytes spill to a file: 64 MiB over MAX_SESSIONS.
SESSION_IN_MEMORY = 64 << 10
_LOCK_POLL = (0.001, 0.05)  # seconds between tries for a shared session's lock: first, most


def _unknown(upload_id: str, repository: str) -> HttpError:
    return HttpError(
        404, f"no upload {upload_id[:40]!r} of yours in {repository}", code="BLOB_UPLOAD_UNKNOWN"
    )


def _over(upload_id: str) -> HttpError:
    return HttpError(404, f"upload {upload_id} is over", code="BLOB_UPLOAD_UNKNOWN")


def _digest_invalid(actual: str, expected: str) -> HttpError:
    return HttpError(
        400, f"the upload hashes to sha256:{actual}, not sha256:{expected}", code="DIGEST_INVALID"
    )


def _too_many() -> HttpError:
    return HttpError(429, f"{MAX_SESSIONS} uploads are open already", code="TOOMANYREQUESTS")


class UploadSession(abc.ABC):
    """A session held by one request: nothing else changes it until the request lets go."""

    def __init__(self, backend: Backend, upload_id: str, repository: str) -> None:
        self.backend = backend
        self.id = upload_id
        self.repository = repository
        self.size = 0  # bytes so far

    @abc.abstractmethod
    async def append(self, chunk: bytes) -> None:
        """Add chunk to the bytes so far."""

    @abc.abstractmethod
    def chunks(self) -> Iterator[bytes]:
        """The bytes so far, from the first (blocking: on a worker thread)."""

    @abc.abstractmethod
    async def end(self) -> None:
        """The session is over (cancelled, finished, or its bytes no longer what the
        client sent)."""

    async def finish(self, sha256: str) -> None:
        """Store the bytes so far as the CAS blob of hash sha256, verified on the way;
        DIGEST_INVALID (400) if they hash to another. The session is over either way."""
        try:
            await self.backend.run(self._store, sha256)
        finally:
            await self.end()

    def _store(self, sha256: str) -> None:
        # The store's writer hashes what it takes and refuses a mismatch, so the bytes
        # are read and hashed once; a blob stored already is hashed here instead.
        blob = BlobId(sha256, self.size)
        store = self.backend.store
        if not store.find_missing([blob]):
            if (actual := self._hash()) != sha256:
                raise _digest_invalid(actual, sha256)
            return
        writer = store.open_writer(blob)
        try:
            for chunk in self.chunks():
                writer.write(chunk)
            writer.commit()
        except DigestError:
            raise _digest_invalid(self._hash(), sha256) from None
        finally:
            writer.abort()

    def _hash(self) -> str:
        sha = hashlib.sha256()
        for chunk in self.chunks():
            sha.update(chunk)
        return sha.hexdigest()


class UploadSessions(abc.ABC):
    """The server's open upload sessions, bounded per caller, in all and in idle time."""

    def __init__(self, backend: Backend, idle_seconds: float) -> None:
        self.backend = backend
        self.idle_seconds = idle_seconds

    @abc.abstractmethod
    async def open(self, repository: str, owner: str) -> str:
        """A new session's id, after ending idle sessions and, past the bound, the
        owner's oldest; TOOMANYREQUESTS (429) when the server has too many."""

    @abc.abstractmethod
    async def status(self, upload_id: str, repository: str, owner: str) -> int:
        """The bytes so far of the owner's session in repository (which counts as a use);
        BLOB_UPLOAD_UNKNOWN (404) for any other."""

    @abc.abstractmethod
    def hold(
        self, upload_id: str, repository: str, owner: str
    ) -> contextlib.AbstractAsyncContextManager[UploadSession]:
        """The owner's session in repository, once the requests before on it are done,
        held until the block ends; BLOB_UPLOAD_UNKNOWN (404) for any other, or if it
        ended while waiting."""

    @abc.abstractmethod
    async def expire(self) -> bool:
        """End the sessions idle for idle_seconds; whether any session is still open."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Let go of what this process holds, when the server stops."""


def open_upload_sessions(
    backend: Backend, idle_seconds: float, shared_directory: str | None
) -> UploadSessions:
    """The sessions of this server: in a directory its workers share, if given, else in
    this process."""
    if shared_directory is None:
        return MemorySessions(backend, idle_seconds)
    return SharedSessions(backend, idle_seconds, pathlib.Path(shared_directory))


# ---- one process ----
class MemorySession(UploadSession):
    def __init__(self, sessions: MemorySessions, repository: str, owner: str) -> None:
        super().__init__(sessions.backend, uuid.uuid4().hex, repository)
        self.sessions = sessions
        self.owner = owner
        self.spooled: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - see end
            max_size=SESSION_IN_MEMORY, prefix="slipstream-oci-upload-"
        )
        self.touched = time.monotonic()
        self.lock = asyncio.Lock()

    async def append(self, chunk: bytes) -> None:
        await self.backend.run(self.spooled.write, chunk)
        self.size += len(chunk)

    def chunks(self) -> Iterator[bytes]:
        self.spooled.seek(0)
        while chunk := self.spooled.read(CHUNK):
            yield chunk

    async def end(self) -> None:
        self.sessions.sessions.pop(self.id, None)
        await self.backend.run(self.spooled.close)


class MemorySessions(UploadSessions):
    """Sessions in this process's memory (spilling to temporary files)."""

    def __init__(self, backend: Backend, idle_seconds: float = SESSION_IDLE_SECONDS) -> None:
        super().__init__(backend, idle_seconds)
        self.sessions: dict[str, MemorySession] = {}

    async def open(self, repository: str, owner: str) -> str:
        await self.expire()
        mine = sorted(
            (s for s in self.sessions.values() if s.owner == owner), key=lambda s: s.touched
        )
        for oldest in mine[: max(0, len(mine) + 1 - MAX_SESSIONS_PER_CALLER)]:
            await oldest.end()
        if len(self.sessions) >= MAX_SESSIONS:
            raise _too_many()
        session = MemorySession(self, repository, owner)
        self.sessions[session.id] = session
        return session.id

    def _get(self, upload_id: str, repository: str, owner: str) -> MemorySession:
        session = self.sessions.get(upload_id)
        if session is None or session.owner != owner or session.repository != repository:
            raise _unknown(upload_id, repository)
        session.touched = time.monotonic()
        return session

    async def status(self, upload_id: str, repository: str, owner: str) -> int:
        return self._get(upload_id, repository, owner).size

    @contextlib.asynccontextmanager
    async def hold(
        self, upload_id: str, repository: str, owner: str
    ) -> AsyncIterator[MemorySession]:
        session = self._get(upload_id, repository, owner)
        async with session.lock:
            if session.spooled.closed:  # ended while this request waited
                raise _over(session.id)
            try:
                yield session
            finally:
                session.touched = time.monotonic()

    async def expire(self) -> bool:
        cutoff = time.monotonic() - self.idle_seconds
        idle = [s for s in self.sessions.values() if s.touched < cutoff and not s.lock.locked()]
        for session in idle:
            await session.end()
        return bool(self.sessions)

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            session.spooled.close()
        self.sessions.clear()


# ---- shared by the workers of one server ----
def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class SharedSession(UploadSession):
    """A session's file, open (and locked, while held) in this process."""

    def __init__(self, sessions: SharedSessions, upload_id: str, repository: str, path: str):
        super().__init__(sessions.backend, upload_id, repository)
        self.path = path
        self.fd = -1

    def open_file(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _unknown(self.id, self.repository) from None

    async def wait_for_lock(self) -> None:
        """Wait for the lock on the file, held by a request in this or another worker."""
        delay, most = _LOCK_POLL
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(delay)
                delay = min(2 * delay, most)
        found = os.fstat(self.fd)
        if found.st_nlink == 0:  # ended while this request waited
            raise _over(self.id)
        self.size = found.st_size

    def let_go(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.utime(self.fd)  # its last use, for the idle timeout
            os.close(self.fd)  # and with it the lock
            self.fd = -1

    def _append(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]

    async def append(self, chunk: bytes) -> None:
        await self.backend.run(self._append, chunk)
        self.size += len(chunk)

    def chunks(self) -> Iterator[bytes]:
        offset = 0
        while chunk := os.pread(self.fd, CHUNK, offset):
            offset += len(chunk)
            yield chunk

    async def end(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            await self.backend.run(os.unlink, self.path)


class SharedSessions(UploadSessions):
    """Sessions as files in a directory that every worker of the server shares."""

    def __init__(self, backend: Backend, idle_seconds: float, directory: pathlib.Path) -> None:
        super().__init__(backend, idle_seconds)
        self.directory = directory
        self.expired_at = -math.inf  # when this process last looked for idle sessions
        self.expiring = threading.Lock()

    def _path(self, upload_id: str, repository: str, owner: str) -> str:
        return f"{self.directory}/{upload_id}.{_key(owner)}.{_key(repository)}"

    def _sessions(self) -> list[tuple[str, str, float]]:
        """(file name, owner's key, last use) of every session's file."""
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                parts = entry.name.split(".")
                with contextlib.suppress(FileNotFoundError):  # ended meanwhile
                    if len(parts) == 3:
                        found.append((entry.name, parts[1], entry.stat().st_mtime))
        return found

    def _end_if_idle(self, name: str, cutoff: float) -> bool:
        """Remove a session's file unless a request holds it or used it since cutoff;
        whether it went."""
        path = f"{self.directory}/{name}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            found = os.fstat(fd)
            if found.st_nlink and found.st_mtime < cutoff:
                os.unlink(path)
                return True
            return found.st_nlink == 0
        except BlockingIOError:
            return False  # held by a request
        except FileNotFoundError:
            return True
        finally:
            os.close(fd)

    def _expire(self, now: float) -> list[tuple[str, str, float]]:
        """The sessions left after ending the idle ones."""
        cutoff = now - self.idle_seconds
        return [
            s for s in self._sessions() if not (s[2] < cutoff and self._end_if_idle(s[0], cutoff))
        ]

    def _open(self, repository: str, owner: str) -> str:
        left = self._expire(time.time())
        owner_key = _key(owner)
        # The least recently used first; of those used in the same tick of the file
        # system's clock, the first opened (an id starts with its time).
        mine = sorted((s for s in left if s[1] == owner_key), key=lambda s: (s[2], s[0]))
        oldest = mine[: max(0, len(mine) + 1 - MAX_SESSIONS_PER_CALLER)]
        for name, _, _ in oldest:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.directory}/{name}")
        if len(left) - len(oldest) >= MAX_SESSIONS:
            raise _too_many()
        upload_id = f"{time.time_ns():016x}{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        os.close(os.open(self._path(upload_id, repository, owner), flags, 0o600))
        return upload_id

    async def open(self, repository: str, owner: str) -> str:
        return await self.backend.run(self._open, repository, owner)

    def _status(self, upload_id: str, repository: str, owner: str) -> int:
        path = self._path(upload_id, repository, owner)
        try:
            os.utime(path)
            return os.stat(path).st_size
        except FileNotFoundError:
            raise _unknown(upload_id, repository) from None

    async def status(self, upload_id: str, repository: str, owner: str) -> int:
        return await self.backend.run(self._status, upload_id, repository, owner)

    @contextlib.asynccontextmanager
    async def hold(
        self, upload_id: str, repository: str, owner: str
    ) -> AsyncIterator[SharedSession]:
        session = SharedSession(
            self, upload_id, repository, self._path(upload_id, repository, owner)
        )
        await self.backend.run(session.open_file)
        try:
            await session.wait_for_lock()
            yield session
        finally:
            session.let_go()

    def _expire_now(self) -> bool:
        with self.expiring:  # one look at a time in this process
            return bool(self._expire(time.time()))

    async def expire(self) -> bool:
        # A look stats every session's file: each worker looks at most every quarter
        # of the timeout, and at least once a second while asked to.
        now = time.monotonic()
        if now - self.expired_at < min(1.0, self.idle_seconds / 4):
            return True
        self.expired_at = now
        return await self.backend.run(self._expire_now)


def shared_sessions_dir(root: pathlib.Path) -> pathlib.Path:
    """Where the workers of a server on the disk store (or tier) under root keep the
    shared upload sessions."""
    return root / "tmp" / "oci-sessions"


def remove_shared_sessions(root: pathlib.Path) -> None:
    """Remove the shared sessions a `--workers` server on the store under root left
    when it was killed before it could clean up (a single-process server starting
    there keeps its sessions in memory, so the files are nobody's)."""
    shutil.rmtree(shared_sessions_dir(root), ignore_errors=True)


def clear_shared_sessions(directory: pathlib.Path) -> None:
    """Make the directory of shared sessions, empty (the sessions of a server gone)."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.iterdir():
        with contextlib.suppress(OSError):
            leftover.unlink()
