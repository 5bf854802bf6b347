"""The pure core: tree encoding, decoding and the checks on untrusted trees."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.client.layer_tree import (
    DirNode,
    FileNode,
    IncompleteTree,
    SymlinkNode,
    TreeLimits,
    UnsafeTree,
    check_name,
    decode_tree,
    encode_tree,
    escapes,
)
from slipstream.core.digests import BlobId
from slipstream.protos import remote_execution_pb2 as re_pb2

names = st.text(
    st.characters(exclude_characters="/\0", exclude_categories=["Cs"]), min_size=1, max_size=8
).filter(lambda n: n not in (".", ".."))
blobs = st.binary(max_size=16).map(BlobId.of)
leaves = st.one_of(
    st.builds(FileNode, blobs, st.integers(0, 0o777)),
    st.builds(
        SymlinkNode,
        st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), min_size=1),
    ),
)
trees = st.recursive(
    st.builds(DirNode, st.dictionaries(names, leaves, max_size=4)),
    lambda children: st.builds(
        DirNode, st.dictionaries(names, st.one_of(leaves, children), max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(trees)
def test_encode_decode_round_trip(tree: DirNode) -> None:
    encoded = encode_tree(tree)
    assert decode_tree(encoded.root, encoded.directories) == tree
    assert encode_tree(tree) == encoded  # deterministic


def test_children_are_sorted_by_name() -> None:
    tree = DirNode(
        {"b": DirNode(), "a": DirNode(), "Z": FileNode(BlobId.of(b"z")), "é": SymlinkNode("x")}
    )
    encoded = encode_tree(tree)
    root = re_pb2.Directory.FromString(encoded.directories[encoded.root])
    assert [d.name for d in root.directories] == ["a", "b"]
    assert [f.name for f in root.files] == ["Z"]


def test_empty_directory_is_the_empty_blob() -> None:
    assert encode_tree(DirNode()).root == BlobId.of(b"")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc", "nul\0byte"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafeTree):
        check_name(name)


def _raw(directory: re_pb2.Directory) -> tuple[BlobId, dict[BlobId, bytes]]:
    data = directory.SerializeToString()
    return BlobId.of(data), {BlobId.of(data): data}


def test_duplicate_names_across_kinds_are_refused() -> None:
    d = re_pb2.Directory()
    d.files.add(name="x", digest=BlobId.of(b"").to_proto())
    d.symlinks.add(name="x", target="/etc")
    root, blobs_ = _raw(d)
    with pytest.raises(UnsafeTree, match="appears twice"):
        decode_tree(root, blobs_)


def test_blob_not_matching_its_digest_is_refused() -> None:
    d = re_pb2.Directory()
    d.files.add(name="x", digest=BlobId.of(b"").to_proto())
    root, _ = _raw(d)
    with pytest.raises(UnsafeTree, match="does not match"):
        decode_tree(root, {root: b"\x0a\x00"})


def test_missing_subdirectory_is_incomplete() -> None:
    d = re_pb2.Directory()
    d.directories.add(name="sub", digest=BlobId.of(b"not here").to_proto())
    root, blobs_ = _raw(d)
    with pytest.raises(IncompleteTree):
        decode_tree(root, blobs_)


def test_strict_symlinks() -> None:
    assert escapes((), "/etc/passwd")
    assert escapes(("a",), "../../x")
    assert not escapes(("a", "b"), "../../x")
    assert not escapes((), "./a/../b")
    d = re_pb2.Directory()
    d.symlinks.add(name="python", target="/usr/bin/python3")
    root, blobs_ = _raw(d)
    assert decode_tree(root, blobs_).entries["python"] == SymlinkNode("/usr/bin/python3")
    with pytest.raises(UnsafeTree, match="points outside"):
        decode_tree(root, blobs_, strict_symlinks=True)


def test_modes_come_from_unix_mode_else_the_executable_bit() -> None:
    d = re_pb2.Directory()
    d.files.add(name="a", digest=BlobId.of(b"").to_proto(), is_executable=True)
    d.files.add(name="b", digest=BlobId.of(b"").to_proto())
    special = d.files.add(name="c", digest=BlobId.of(b"").to_proto(), is_executable=True)
    special.node_properties.unix_mode.value = 0o104750  # a regular file, setuid
    root, blobs_ = _raw(d)
    tree = decode_tree(root, blobs_)
    assert {n: e.mode for n, e in tree.entries.items() if isinstance(e, FileNode)} == {
        "a": 0o755,
        "b": 0o644,
        "c": 0o750,  # setuid dropped, rwx kept
    }


def _bomb(levels: int, fan_out: int, files: int) -> tuple[BlobId, dict[BlobId, bytes]]:
    """A few Directory messages naming each other fan_out times: files * fan_out**levels
    files in all."""
    d = re_pb2.Directory()
    for i in range(files):
        d.files.add(name=f"f{i}", digest=BlobId.of(b"x").to_proto())
    root, blobs_ = _raw(d)
    for _ in range(levels):
        d = re_pb2.Directory()
        for i in range(fan_out):
            d.directories.add(name=f"d{i}", digest=root.to_proto())
        root, more = _raw(d)
        blobs_.update(more)
    return root, blobs_


def test_limits_count_repeats_before_expanding() -> None:
    root, blobs_ = _bomb(levels=6, fan_out=10, files=10)  # 10 million files, 7 messages
    started = time.monotonic()
    with pytest.raises(UnsafeTree, match="more than 1,000,000 entries"):
        decode_tree(root, blobs_)
    assert time.monotonic() - started < 1.0
    small = TreeLimits(entries=1_000_000_000, depth=5)
    with pytest.raises(UnsafeTree, match="deeper than 5 levels"):
        decode_tree(root, blobs_, limits=small)
    with pytest.raises(UnsafeTree, match="more than 1,000 bytes of files"):
        decode_tree(root, blobs_, limits=TreeLimits(entries=10**9, file_bytes=1000))
    root, blobs_ = _bomb(levels=2, fan_out=10, files=10)  # 1,000 files, 110 directories
    tree = decode_tree(root, blobs_, limits=TreeLimits(entries=1110))
    assert len(tree.entries) == 10
    assert tree.entries["d0"] is tree.entries["d9"]  # repeats share one decoded node
    with pytest.raises(UnsafeTree, match="entries"):
        decode_tree(root, blobs_, limits=TreeLimits(entries=1109))
