"""Directory trees as REAPI Directory messages: pure encoding, decoding and checks.

A tree is a DirNode whose entries map names to files, symlinks and
subdirectories; one dict means a name can only be one thing. Encoding gives
the root digest and every Directory blob (children sorted by name, as REAPI
requires). Decoding treats the blobs as untrusted: every blob must match its
digest and every name must be a plain file name.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from slipstream.core.digests import BlobId, DigestError
from slipstream.protos import remote_execution_pb2 as re_pb2

MAX_DEPTH = 128
MAX_ENTRIES = 5_000_000  # bounds the expansion of a tree that reuses subtrees


class UnsafeTree(Exception):
    """A tree that must not be restored (bad name, bad digest, escape, cycle)."""


class IncompleteTree(Exception):
    """Directory blobs of a tree are not available."""


@dataclass(frozen=True, slots=True)
class FileNode:
    blob: BlobId
    executable: bool = False


@dataclass(frozen=True, slots=True)
class SymlinkNode:
    target: str


@dataclass(slots=True)
class DirNode:
    entries: dict[str, Entry] = field(default_factory=dict)


Entry = FileNode | SymlinkNode | DirNode


@dataclass(frozen=True, slots=True)
class EncodedTree:
    root: BlobId
    directories: dict[BlobId, bytes]  # every Directory blob, by digest


def check_name(name: str) -> None:
    """Refuse anything but a single, plain path component."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UnsafeTree(f"entry name {name[:100]!r} is not a plain file name")


def escapes(link_dir: tuple[str, ...], target: str) -> bool:
    """Whether a symlink in link_dir pointing at target leaves the tree (lexically)."""
    if target.startswith("/"):
        return True
    depth = len(link_dir)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def encode_tree(root: DirNode) -> EncodedTree:
    """The root digest and all Directory blobs of a tree (deterministic)."""
    blobs: dict[BlobId, bytes] = {}

    def encode(node: DirNode) -> BlobId:
        directory = re_pb2.Directory()
        for name in sorted(node.entries):
            entry = node.entries[name]
            if isinstance(entry, FileNode):
                directory.files.add(
                    name=name, digest=entry.blob.to_proto(), is_executable=entry.executable
                )
            elif isinstance(entry, SymlinkNode):
                directory.symlinks.add(name=name, target=entry.target)
            else:
                directory.directories.add(name=name, digest=encode(entry).to_proto())
        data = directory.SerializeToString(deterministic=True)
        blob = BlobId.of(data)
        blobs[blob] = data
        return blob

    return EncodedTree(encode(root), blobs)


def parse_directory(blob: BlobId, data: bytes) -> re_pb2.Directory:
    """A Directory message from untrusted bytes that must match blob."""
    if BlobId.of(data) != blob:
        raise UnsafeTree(f"directory blob {blob} does not match its digest")
    directory = re_pb2.Directory()
    try:
        directory.ParseFromString(data)
    except Exception:
        raise UnsafeTree(f"blob {blob} is not a Directory message") from None
    return directory


def child_directories(directory: re_pb2.Directory) -> list[BlobId]:
    """The digests of a Directory's subdirectories."""
    try:
        return [BlobId.from_proto(d.digest) for d in directory.directories]
    except DigestError as exc:
        raise UnsafeTree(f"bad subdirectory digest: {exc}") from None


def decode_tree(
    root: BlobId, directories: Mapping[BlobId, bytes], *, strict_symlinks: bool = False
) -> DirNode:
    """Rebuild a tree from untrusted Directory blobs, checking every name and digest.

    With strict_symlinks, symlinks that are absolute or lead out of the tree are
    refused too; otherwise their targets are kept as data (restore never writes
    through a symlink, so a target cannot make it write outside the tree).
    """
    parsed: dict[BlobId, re_pb2.Directory] = {}
    count = 0

    def get(blob: BlobId) -> re_pb2.Directory:
        if blob not in parsed:
            data = directories.get(blob)
            if data is None:
                raise IncompleteTree(f"directory {blob} is missing from the CAS")
            parsed[blob] = parse_directory(blob, data)
        return parsed[blob]

    def decode(blob: BlobId, path: tuple[str, ...]) -> DirNode:
        nonlocal count
        if len(path) > MAX_DEPTH:
            raise UnsafeTree(f"tree is deeper than {MAX_DEPTH} levels (or has a cycle)")
        directory = get(blob)
        node = DirNode()
        count += len(directory.files) + len(directory.symlinks) + len(directory.directories)
        if count > MAX_ENTRIES:
            raise UnsafeTree(f"tree has more than {MAX_ENTRIES:,} entries")
        where = "/".join(path) or "the root directory"
        for f in directory.files:
            try:
                file_blob = BlobId.from_proto(f.digest)
            except DigestError as exc:
                raise UnsafeTree(f"file {f.name[:100]!r} in {where}: {exc}") from None
            _add(node, f.name, FileNode(file_blob, f.is_executable), where)
        for s in directory.symlinks:
            if not s.target or "\0" in s.target:
                raise UnsafeTree(f"symlink {s.name[:100]!r} in {where} has an invalid target")
            if strict_symlinks and escapes(path, s.target):
                raise UnsafeTree(
                    f"symlink {posixpath.join(*path, s.name)[:200]!r} points outside the tree "
                    f"({s.target[:100]!r})"
                )
            _add(node, s.name, SymlinkNode(s.target), where)
        for d, child in zip(directory.directories, child_directories(directory), strict=True):
            check_name(d.name)
            _add(node, d.name, decode(child, (*path, d.name)), where)
        return node

    return decode(root, ())


def _add(node: DirNode, name: str, entry: Entry, where: str) -> None:
    check_name(name)
    if name in node.entries:
        raise UnsafeTree(f"name {name[:100]!r} appears twice in {where}")
    node.entries[name] = entry


def walk(node: DirNode, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Entry]]:
    """Every entry below node, parents before children, as (path, entry)."""
    for name in sorted(node.entries):
        entry = node.entries[name]
        yield (*path, name), entry
        if isinstance(entry, DirNode):
            yield from walk(entry, (*path, name))


@dataclass(frozen=True, slots=True)
class TreeCounts:
    files: int
    symlinks: int
    directories: int  # not counting the root
    file_bytes: int
    distinct_blobs: int


def count(node: DirNode) -> TreeCounts:
    """How many of each thing a tree holds."""
    files = symlinks = dirs = size = 0
    blobs: set[BlobId] = set()
    for _path, entry in walk(node):
        if isinstance(entry, FileNode):
            files += 1
            size += entry.blob.size
            blobs.add(entry.blob)
        elif isinstance(entry, SymlinkNode):
            symlinks += 1
        else:
            dirs += 1
    return TreeCounts(files, symlinks, dirs, size, len(blobs))
