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

PERMISSION_BITS = 0o777  # the mode bits a layer keeps: rwx for user, group and other
MAX_DEPTH_LIMIT = 512  # the recursion below stays far from Python's limit


@dataclass(frozen=True, slots=True)
class TreeLimits:
    """What a restore accepts from the server, checked before anything is written.

    Subtrees can be shared (a Directory named many times), so a few kilobytes of
    Directory messages can describe millions of entries: entries, depth and file
    bytes count every repeat, and are measured over the distinct Directory
    messages before the tree is expanded.
    """

    entries: int = 1_000_000  # files, symlinks and directories, repeats included
    depth: int = 128  # directory levels below the root
    file_bytes: int = 64 << 30  # content of all files, repeats included
    tree_bytes: int = 256 << 20  # the distinct Directory messages, downloaded

    def refuse_entries(self) -> UnsafeTree:
        return UnsafeTree(f"tree has more than {self.entries:,} entries (see --max-entries)")

    def refuse_depth(self) -> UnsafeTree:
        return UnsafeTree(f"tree is deeper than {self.depth} levels (see --max-depth)")

    def refuse_file_bytes(self) -> UnsafeTree:
        return UnsafeTree(
            f"tree holds more than {self.file_bytes:,} bytes of files (see --max-bytes)"
        )

    def refuse_tree_bytes(self) -> UnsafeTree:
        return UnsafeTree(
            f"tree's Directory messages exceed {self.tree_bytes:,} bytes (see --max-tree-bytes)"
        )


DEFAULT_LIMITS = TreeLimits()


class UnsafeTree(Exception):
    """A tree that must not be restored (bad name, bad digest, escape, cycle)."""


class IncompleteTree(Exception):
    """Directory blobs of a tree are not available."""


@dataclass(frozen=True, slots=True)
class FileNode:
    blob: BlobId
    mode: int = 0o644  # permission bits only (PERMISSION_BITS)

    @property
    def executable(self) -> bool:
        return bool(self.mode & 0o100)


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
                added = directory.files.add(
                    name=name, digest=entry.blob.to_proto(), is_executable=entry.executable
                )
                added.node_properties.unix_mode.value = entry.mode
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


def file_mode(f: re_pb2.FileNode) -> int:
    """The permission bits a FileNode carries: its unix_mode (setuid, setgid and sticky
    dropped), else 0755 or 0644 by its executable bit (trees from other tools)."""
    if f.HasField("node_properties") and f.node_properties.HasField("unix_mode"):
        return f.node_properties.unix_mode.value & PERMISSION_BITS
    return 0o755 if f.is_executable else 0o644


def measure_tree(
    root: BlobId, directories: Mapping[BlobId, re_pb2.Directory], limits: TreeLimits
) -> None:
    """Refuse a tree over limits, counting every repeat of a shared subtree, in time
    and memory that grow with the distinct Directory messages only."""
    sizes: dict[BlobId, tuple[int, int]] = {}  # entries and file bytes below each directory

    def measure(blob: BlobId, depth: int) -> tuple[int, int]:
        if depth > limits.depth:
            raise limits.refuse_depth()
        known = sizes.get(blob)
        if known is not None:
            return known
        directory = directories.get(blob)
        if directory is None:
            raise IncompleteTree(f"directory {blob} is missing from the CAS")
        entries = len(directory.files) + len(directory.symlinks) + len(directory.directories)
        file_bytes = sum(max(f.digest.size_bytes, 0) for f in directory.files)
        for child in child_directories(directory):
            child_entries, child_bytes = measure(child, depth + 1)
            entries += child_entries
            file_bytes += child_bytes
            if entries > limits.entries:
                raise limits.refuse_entries()
            if file_bytes > limits.file_bytes:
                raise limits.refuse_file_bytes()
        if entries > limits.entries:
            raise limits.refuse_entries()
        if file_bytes > limits.file_bytes:
            raise limits.refuse_file_bytes()
        sizes[blob] = entries, file_bytes
        return entries, file_bytes

    measure(root, 0)


def decode_tree(
    root: BlobId,
    directories: Mapping[BlobId, bytes],
    *,
    strict_symlinks: bool = False,
    limits: TreeLimits = DEFAULT_LIMITS,
) -> DirNode:
    """Rebuild a tree from untrusted Directory blobs, checking every name and digest.

    The tree is measured against limits (measure_tree) before it is expanded.
    With strict_symlinks, symlinks that are absolute or lead out of the tree are
    refused too; otherwise their targets are kept as data (restore never writes
    through a symlink, so a target cannot make it write outside the tree).
    """
    parsed: dict[BlobId, re_pb2.Directory] = {}
    frontier = [root]
    while frontier:
        blob = frontier.pop()
        if blob in parsed:
            continue
        data = directories.get(blob)
        if data is None:
            raise IncompleteTree(f"directory {blob} is missing from the CAS")
        parsed[blob] = parse_directory(blob, data)
        frontier.extend(child_directories(parsed[blob]))
    measure_tree(root, parsed, limits)
    # A subtree named many times is decoded once per depth (all that the checks below
    # depend on) and shared: memory grows with the distinct subtrees, not the repeats.
    decoded: dict[tuple[BlobId, int], DirNode] = {}

    def decode(blob: BlobId, path: tuple[str, ...]) -> DirNode:
        known = decoded.get((blob, len(path)))
        if known is not None:
            return known
        directory = parsed[blob]
        node = decoded[blob, len(path)] = DirNode()
        where = "/".join(path) or "the root directory"
        for f in directory.files:
            try:
                file_blob = BlobId.from_proto(f.digest)
            except DigestError as exc:
                raise UnsafeTree(f"file {f.name[:100]!r} in {where}: {exc}") from None
            _add(node, f.name, FileNode(file_blob, file_mode(f)), where)
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
