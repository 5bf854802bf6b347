"""The pure core: tree encoding, decoding and the checks on untrusted trees."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.client.layer_tree import (
    DirNode,
    FileNode,
    IncompleteTree,
    SymlinkNode,
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
    st.builds(FileNode, blobs, st.booleans()),
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
