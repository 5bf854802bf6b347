"""Save and restore directory trees by key through the CAS (the Python API).

    with LayerClient(connect(address)) as layers:
        saved = layers.save([Path(".venv")], "venv-linux-abc123")
        got = layers.restore("venv-linux-abc124", ["venv-linux-"], Path("."))
        got.hit  # "exact", "partial" or "miss"

Paths are stored relative to a base directory (the working directory by
default) and restored under the target directory at the same relative place,
as actions/cache does. Files become CAS blobs, directories REAPI Directory
messages; the server maps the key to the root digest.

Restoring never writes outside the target: every directory is opened relative
to its parent with O_NOFOLLOW, files are written to a temporary name and
renamed into place (which replaces a symlink or a hard link rather than
writing through it), a symlink or file found where a directory belongs is
removed, not followed, and a file already in place is only ever chmod-ed when
it has no other name (st_nlink 1): a link restore did not create is replaced.

Files keep their permission bits (rwx for user, group and other; not setuid,
setgid or sticky), in the FileNode's unix_mode. A tree is measured against
TreeLimits (entries, depth, bytes) while it is read, before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import grpc

from slipstream.client.cas_client import (
    BlobMissing,
    BlobSource,
    CasClient,
    TransferStats,
    rpc_error,
)
from slipstream.client.layer_tree import (
    PERMISSION_BITS,
    DirNode,
    Entry,
    FileNode,
    IncompleteTree,
    SymlinkNode,
    TreeLimits,
    child_directories,
    count,
    decode_tree,
    encode_tree,
    parse_directory,
)
from slipstream.core.digests import BlobId
from slipstream.protos import layers_pb2
from slipstream.protos import layers_pb2_grpc as layers_grpc

HitKind = Literal["exact", "partial", "miss"]
READ_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LayerError(Exception):
    """Save or restore failed; the message is one line."""


class LayerExists(LayerError):
    """The key already names a layer and overwrite was not asked for."""


class Progress(Protocol):
    """Receives progress from save and restore (called from several threads)."""

    def phase(self, description: str, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def skipped(self, nbytes: int) -> None: ...


class NoProgress:
    """Progress nobody watches (also usable as a context manager, like RichProgress)."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def phase(self, description: str, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def skipped(self, nbytes: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class SaveResult:
    key: str
    root: BlobId
    files: int
    symlinks: int
    directories: int
    file_bytes: int
    blobs: int  # distinct blobs in the layer, Directory messages included
    uploaded_blobs: int
    uploaded_bytes: int  # content bytes sent
    wire_bytes: int  # bytes on the wire, after compression
    replaced: bool
    special_skipped: int  # sockets, fifos and devices, which are not saved


@dataclass(frozen=True, slots=True)
class RestoreResult:
    hit: HitKind
    key: str | None  # the key that hit
    root: BlobId | None = None
    files: int = 0
    symlinks: int = 0
    directories: int = 0
    written_files: int = 0
    written_bytes: int = 0
    skipped_files: int = 0  # already present with the right content
    skipped_bytes: int = 0
    downloaded_blobs: int = 0
    wire_bytes: int = 0


@dataclass(frozen=True, slots=True)
class LayerHit:
    key: str
    root: BlobId
    exact: bool
    created: float


# ---------------------------------------------------------------- scanning


@dataclass
class Scan:
    """A tree read from disk, with where each blob's content can be read."""

    root: DirNode = field(default_factory=DirNode)
    sources: dict[BlobId, BlobSource] = field(default_factory=dict)
    special_skipped: int = 0


def relative_parts(path: Path, base: Path) -> tuple[str, ...]:
    """path as components relative to base; refuses paths outside base."""
    absolute = Path(os.path.normpath(base / path))
    try:
        rel = absolute.relative_to(os.path.normpath(base))
    except ValueError:
        raise LayerError(f"{path} is outside {base}; paths must be under it") from None
    return rel.parts


def hash_file(path: Path) -> BlobId:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return BlobId(sha.hexdigest(), size)


def scan(paths: Sequence[Path], base: Path, workers: int = 4) -> Scan:
    """Read the trees at paths (relative to base) and hash their files in parallel."""
    result = Scan()
    pending: list[tuple[DirNode, str, Path, int]] = []

    def place(parts: tuple[str, ...]) -> tuple[DirNode, str]:
        node = result.root
        for part in parts[:-1]:
            child = node.entries.setdefault(part, DirNode())
            if not isinstance(child, DirNode):
                raise LayerError(f"{'/'.join(parts)} is inside {part}, which is not a directory")
            node = child
        return node, parts[-1]

    def visit(node: DirNode, name: str, path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise LayerError(f"{path} does not exist") from None
        if stat.S_ISLNK(st.st_mode):
            node.entries[name] = SymlinkNode(os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            pending.append((node, name, path, st.st_mode & PERMISSION_BITS))
        elif stat.S_ISDIR(st.st_mode):
            child = node.entries.get(name)
            if not isinstance(child, DirNode):
                child = node.entries[name] = DirNode()
            with os.scandir(path) as it:
                names = sorted(e.name for e in it)
            for sub in names:
                visit(child, sub, path / sub)
        else:
            result.special_skipped += 1

    for path in paths:
        parts = relative_parts(path, base)
        if not parts:  # the base itself
            with os.scandir(base) as it:
                names = sorted(e.name for e in it)
            for sub in names:
                visit(result.root, sub, base / sub)
        else:
            node, name = place(parts)
            visit(node, name, base.joinpath(*parts))
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(lambda item: hash_file(item[2]), pending))
    for (node, name, path, mode), blob in zip(pending, digests, strict=True):
        node.entries[name] = FileNode(blob, mode)
        result.sources.setdefault(blob, path)
    return result


# ---------------------------------------------------------------- restoring


def _open_child_dir(parent_fd: int, name: str) -> int:
    """Open (creating if needed) a real directory name under parent_fd.

    A symlink or file in the way is removed, never followed.
    """
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(name, dir_fd=parent_fd)  # a symlink or file: not a directory
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def open_tree_dir(root_fd: int, parts: Sequence[str]) -> int:
    """An fd for root/parts, every component opened with O_NOFOLLOW (no creation)."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_file(dir_fd: int, name: str, node: FileNode) -> bool | None:
    """True if name already holds node's content and mode; None if absent; False if
    it must be written (replaced by a new file renamed over it).

    The mode is fixed in place only on a file with no other name: a hard link
    (st_nlink > 1) may be another file's name, outside the target, and is
    replaced instead; a symlink is never opened (O_NOFOLLOW).
    """
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise LayerError(f"a directory is in the way of file {name!r}")
    if not stat.S_ISREG(st.st_mode) or st.st_size != node.blob.size:
        return False
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:  # gone, swapped for a link, or unreadable: written anew
        return False
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)  # the file opened, which the name may no longer be
        if not stat.S_ISREG(st.st_mode) or st.st_size != node.blob.size:
            return False
        sha = hashlib.sha256()
        while chunk := f.read(READ_CHUNK):
            sha.update(chunk)
        if sha.hexdigest() != node.blob.hash:
            return False
        if stat.S_IMODE(st.st_mode) == node.mode:
            return True
        if st.st_nlink != 1:
            return False
        os.fchmod(fd, node.mode)
    return True


def _place_symlink(dir_fd: int, name: str, target: str) -> None:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=dir_fd) == target:
            return
        if stat.S_ISDIR(st.st_mode):
            raise LayerError(f"a directory is in the way of symlink {name!r}")
        os.unlink(name, dir_fd=dir_fd)
    os.symlink(target, name, dir_fd=dir_fd)


@dataclass
class _Plan:
    """Files still to write, grouped by blob: (directory parts, name, node)."""

    needed: dict[BlobId, list[tuple[tuple[str, ...], str, FileNode]]] = field(default_factory=dict)
    skipped_files: int = 0
    skipped_bytes: int = 0


def prepare(root_fd: int, tree: DirNode, progress: Progress) -> _Plan:
    """Create directories and symlinks; list the files that need content."""
    plan = _Plan()

    def visit(dir_fd: int, node: DirNode, path: tuple[str, ...]) -> None:
        for name in sorted(node.entries):
            entry: Entry = node.entries[name]
            if isinstance(entry, DirNode):
                child_fd = _open_child_dir(dir_fd, name)
                try:
                    visit(child_fd, entry, (*path, name))
                finally:
                    os.close(child_fd)
            elif isinstance(entry, SymlinkNode):
                _place_symlink(dir_fd, name, entry.target)
            elif _same_file(dir_fd, name, entry):
                plan.skipped_files += 1
                plan.skipped_bytes += entry.blob.size
                progress.skipped(entry.blob.size)
            else:
                plan.needed.setdefault(entry.blob, []).append((path, name, entry))

    visit(root_fd, tree, ())
    return plan


def _write_file(
    root_fd: int, path: tuple[str, ...], name: str, node: FileNode, chunks: Iterator[bytes]
) -> None:
    """Write chunks to a temporary file beside name, then rename it into place."""
    dir_fd = open_tree_dir(root_fd, path)
    tmp = f".slipstream-{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                for chunk in chunks:
                    f.write(chunk)
            os.fchmod(fd, node.mode)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)


def _copy_within(
    root_fd: int, source: tuple[tuple[str, ...], str], target: tuple[tuple[str, ...], str, FileNode]
) -> None:
    src_dir = open_tree_dir(root_fd, source[0])
    try:
        fd = os.open(source[1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    finally:
        os.close(src_dir)
    with os.fdopen(fd, "rb") as f:
        _write_file(root_fd, target[0], target[1], target[2], iter(lambda: f.read(READ_CHUNK), b""))


# ---------------------------------------------------------------- the client


class LayerClient:
    """Save and restore layers through one channel to a Slipstream server."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        workers: int = 8,
        compress: bool = True,
        strict_symlinks: bool = False,
        limits: TreeLimits | None = None,
    ) -> None:
        self.cas = CasClient(channel, workers=workers, compress=compress)
        self.workers = workers
        self.strict_symlinks = strict_symlinks
        self.limits = limits or TreeLimits()
        self._stub = layers_grpc.LayersStub(channel)

    def __enter__(self) -> LayerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.cas.close()

    # ---- the key -> root service ----
    def lookup(self, key: str, restore_keys: Sequence[str] = ()) -> LayerHit | None:
        """The layer for key, else the newest for each restore prefix in order; None on a miss."""
        request = layers_pb2.GetLayerRequest(key=key, restore_prefixes=list(restore_keys))
        try:
            response = self._stub.GetLayer(request, timeout=self.cas.timeout)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise rpc_error(exc, "GetLayer") from None
        root = BlobId.from_proto(response.root_digest)
        return LayerHit(response.key, root, response.exact, response.created)

    def put(self, key: str, root: BlobId, overwrite: bool = False) -> bool:
        """Record key -> root; returns whether a layer was replaced."""
        request = layers_pb2.PutLayerRequest(
            key=key, root_digest=root.to_proto(), overwrite=overwrite
        )
        try:
            return bool(self._stub.PutLayer(request, timeout=self.cas.timeout).replaced)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() is grpc.StatusCode.ALREADY_EXISTS:
                raise LayerExists(f"layer {key!r} already exists") from None
            raise rpc_error(exc, "PutLayer") from None

    # ---- save ----
    def save(
        self,
        paths: Sequence[Path],
        key: str,
        *,
        overwrite: bool = False,
        base: Path | None = None,
        progress: Progress | None = None,
    ) -> SaveResult:
        """Store the trees at paths (relative to base, default the cwd) under key.

        Only blobs the server lacks are uploaded. Raises LayerExists if key is
        taken and overwrite is false (checked before any upload, and again
        atomically at the end).
        """
        progress = progress or NoProgress()
        base = base or Path.cwd()
        if not overwrite and self.lookup(key) is not None:
            raise LayerExists(f"layer {key!r} already exists")
        try:
            found = scan(paths, base, workers=min(self.workers, 4))
        except OSError as exc:
            raise LayerError(f"cannot read {exc.filename}: {exc.strerror}") from None
        encoded = encode_tree(found.root)
        sources: dict[BlobId, BlobSource] = dict(found.sources)
        sources.update(encoded.directories)
        try:
            missing = self.cas.find_missing(sources)
            progress.phase("uploading", sum(b.size for b in missing))
            progress.skipped(sum(b.size for b in sources if b not in missing))
            stats = self.cas.upload({b: sources[b] for b in missing}, progress.advance)
        except OSError as exc:
            raise LayerError(f"cannot read {exc.filename}: {exc.strerror}") from None
        replaced = self.put(key, encoded.root, overwrite)
        counts = count(found.root)
        return SaveResult(
            key=key,
            root=encoded.root,
            files=counts.files,
            symlinks=counts.symlinks,
            directories=counts.directories,
            file_bytes=counts.file_bytes,
            blobs=len(sources),
            uploaded_blobs=stats.blobs,
            uploaded_bytes=stats.bytes,
            wire_bytes=stats.wire_bytes,
            replaced=replaced,
            special_skipped=found.special_skipped,
        )

    # ---- restore ----
    def fetch_tree(self, root: BlobId) -> DirNode:
        """Download and check the Directory messages of a tree, within self.limits.

        Counted as they arrive: the bytes to download before each level is asked
        for, the levels, and the entries each distinct Directory holds (every one
        appears at least once in the tree); decode_tree then counts the repeats.
        """
        limits = self.limits
        blobs: dict[BlobId, bytes] = {}
        frontier = {root}
        levels = tree_bytes = entries = 0
        while frontier:
            if levels > limits.depth:
                raise limits.refuse_depth()
            tree_bytes += sum(b.size for b in frontier)
            if tree_bytes > limits.tree_bytes:
                raise limits.refuse_tree_bytes()
            got = self.cas.read_blobs(frontier)
            blobs.update(got)
            frontier = set()
            for blob, data in got.items():
                directory = parse_directory(blob, data)
                entries += (
                    len(directory.files) + len(directory.symlinks) + len(directory.directories)
                )
                if entries > limits.entries:
                    raise limits.refuse_entries()
                frontier.update(child_directories(directory))
            frontier -= blobs.keys()
            levels += 1
        return decode_tree(root, blobs, strict_symlinks=self.strict_symlinks, limits=limits)

    def restore(
        self,
        key: str,
        restore_keys: Sequence[str] = (),
        into: Path | None = None,
        *,
        progress: Progress | None = None,
    ) -> RestoreResult:
        """Restore the layer for key (or the newest matching a restore prefix) under into.

        Returns hit "miss" and writes nothing when no layer matches. Raises
        UnsafeTree for a tree that must not be restored (before writing anything),
        IncompleteTree / BlobMissing when its blobs are gone from the CAS.
        """
        progress = progress or NoProgress()
        into = into or Path.cwd()
        hit = self.lookup(key, restore_keys)
        if hit is None:
            return RestoreResult("miss", None)
        try:
            tree = self.fetch_tree(hit.root)
        except BlobMissing as exc:
            raise IncompleteTree(f"layer {hit.key!r} is incomplete on the server: {exc}") from None
        counts = count(tree)
        os.makedirs(into, exist_ok=True)
        root_fd = os.open(into, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            progress.phase("checking", counts.file_bytes)
            plan = prepare(root_fd, tree, progress)
            progress.phase("downloading", sum(b.size * len(d) for b, d in plan.needed.items()))
            stats = self._download(root_fd, plan, progress)
        except BlobMissing as exc:
            raise IncompleteTree(f"layer {hit.key!r} is incomplete on the server: {exc}") from None
        finally:
            os.close(root_fd)
        written = sum(len(d) for d in plan.needed.values())
        return RestoreResult(
            hit="exact" if hit.exact else "partial",
            key=hit.key,
            root=hit.root,
            files=counts.files,
            symlinks=counts.symlinks,
            directories=counts.directories,
            written_files=written,
            written_bytes=sum(b.size * len(d) for b, d in plan.needed.items()),
            skipped_files=plan.skipped_files,
            skipped_bytes=plan.skipped_bytes,
            downloaded_blobs=stats.blobs,
            wire_bytes=stats.wire_bytes,
        )

    def _download(self, root_fd: int, plan: _Plan, progress: Progress) -> TransferStats:
        lock = threading.Lock()

        def write(blob: BlobId, chunks: Iterator[bytes]) -> None:
            first, *others = plan.needed[blob]
            _write_file(root_fd, first[0], first[1], first[2], chunks)
            for other in others:
                _copy_within(root_fd, (first[0], first[1]), other)
                with lock:
                    progress.advance(blob.size)

        return self.cas.download(plan.needed, write, progress.advance)
