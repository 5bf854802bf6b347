"""Save and restore through a real `slipstream serve` over a real socket."""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat
import subprocess
import sys
import time

import grpc
import pytest

from slipstream.client.cas_client import CasClient
from slipstream.client.layer_tree import UnsafeTree
from slipstream.client.layers import LayerClient, LayerExists
from slipstream.core.digests import BlobId
from slipstream.protos import remote_execution_pb2 as re_pb2


def snapshot(root: pathlib.Path) -> dict[str, tuple[object, ...]]:
    """Everything restore must keep: kind, content, permission bits, link target."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = pathlib.Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir",)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[rel] = ("file", digest, oct(stat.S_IMODE(st.st_mode)))
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A real virtualenv: ~1,500 files, symlinks (absolute ones too), executables."""
    base = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(base / ".venv")], check=True)
    (base / ".venv" / "empty-dir").mkdir()
    return base


def test_venv_round_trip_then_dedup_then_delta(
    venv: pathlib.Path, channel: grpc.Channel, tmp_path: pathlib.Path
) -> None:
    original = snapshot(venv)
    assert sum(1 for v in original.values() if v[0] == "file") > 1000
    assert any(v[0] == "link" for v in original.values())
    assert any(v[0] == "file" and v[2] for v in original.values())
    with LayerClient(channel) as layers:
        first = layers.save([pathlib.Path(".venv")], "venv-1", base=venv)
        assert first.uploaded_blobs == first.blobs - 1  # all but the empty blob
        got = layers.restore("venv-1", into=tmp_path / "out")
        assert got.hit == "exact" and got.key == "venv-1"
        assert snapshot(tmp_path / "out") == original
        assert got.written_files == first.files

        # The same tree again under another key: nothing goes up.
        again = layers.save([pathlib.Path(".venv")], "venv-2", base=venv)
        assert again.root == first.root
        assert again.uploaded_blobs == 0 and again.uploaded_bytes == 0

        # One file changed: that blob plus the Directory messages from it to the root.
        changed = venv / ".venv" / "lib"
        target = next(p for p in sorted(changed.rglob("*.py")) if p.stat().st_size > 100)
        target.write_bytes(target.read_bytes() + b"\n# changed\n")
        depth = len(target.relative_to(venv).parts)  # directories on the way, root included
        delta = layers.save([pathlib.Path(".venv")], "venv-3", base=venv)
        assert delta.uploaded_blobs == 1 + depth

        # Restoring the new layer over the old tree rewrites only that file.
        back = layers.restore("venv-3", into=tmp_path / "out")
        assert back.written_files == 1
        assert back.skipped_files == first.files - 1
        assert snapshot(tmp_path / "out") == snapshot(venv)


def test_large_duplicate_and_special_files(channel: grpc.Channel, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    big = os.urandom(3 << 20)  # above the batch limit: goes by ByteStream
    (src / "a" / "big.bin").write_bytes(big)
    (src / "a" / "b" / "copy.bin").write_bytes(big)  # the same blob twice
    (src / "tool").write_text("#!/bin/sh\necho hi\n")
    (src / "tool").chmod(0o755)
    (src / "rel-link").symlink_to("a/b/copy.bin")
    (src / "dangling").symlink_to("nowhere")
    os.mkfifo(src / "fifo")
    with LayerClient(channel) as layers:
        saved = layers.save([pathlib.Path(".")], "misc", base=src)
        assert saved.special_skipped == 1
        assert saved.files == 3
        got = layers.restore("misc", into=tmp_path / "out")
    (src / "fifo").unlink()
    assert snapshot(tmp_path / "out") == snapshot(src)
    assert got.written_files == 3


def test_overwrite_needs_consent(channel: grpc.Channel, tmp_path: pathlib.Path) -> None:
    (tmp_path / "f").write_text("one")
    with LayerClient(channel) as layers:
        layers.save([pathlib.Path("f")], "k", base=tmp_path)
        (tmp_path / "f").write_text("two")
        with pytest.raises(LayerExists):
            layers.save([pathlib.Path("f")], "k", base=tmp_path)
        # The server refuses too, atomically, whatever the client checked first.
        root = layers.save([pathlib.Path("f")], "k2", base=tmp_path).root
        with pytest.raises(LayerExists):
            layers.put("k", root)
        assert layers.restore("k", into=tmp_path / "out").key == "k"
        assert (tmp_path / "out" / "f").read_text() == "one"
        replaced = layers.save([pathlib.Path("f")], "k", base=tmp_path, overwrite=True)
        assert replaced.replaced
        layers.restore("k", into=tmp_path / "out")
        assert (tmp_path / "out" / "f").read_text() == "two"


def test_restore_keys_find_the_newest_by_prefix(
    channel: grpc.Channel, tmp_path: pathlib.Path
) -> None:
    with LayerClient(channel) as layers:
        for key in ("deps-b", "deps-c", "deps-a", "other-1"):  # deps-a is newest, not greatest
            (tmp_path / "f").write_text(key)
            layers.save([pathlib.Path("f")], key, base=tmp_path)
            time.sleep(0.01)
        hit = layers.lookup("deps-zzz", ["nothing-", "deps-"])
        assert hit is not None and (hit.key, hit.exact) == ("deps-a", False)
        exact = layers.lookup("deps-c", ["deps-"])
        assert exact is not None and (exact.key, exact.exact) == ("deps-c", True)
        assert layers.lookup("x", ["nothing-"]) is None
        got = layers.restore("deps-new", ["zzz", "other-", "deps-"], tmp_path / "out")
        assert (got.hit, got.key) == ("partial", "other-1")
        assert layers.restore("deps-new", [], tmp_path / "miss").hit == "miss"
        assert not (tmp_path / "miss").exists()


def _put_raw_tree(channel: grpc.Channel, key: str, directories: list[re_pb2.Directory]) -> None:
    """Write Directory messages straight to the CAS (the last one is the root) and name it."""
    blobs = {BlobId.of(d.SerializeToString()): d.SerializeToString() for d in directories}
    blobs[BlobId.of(b"evil")] = b"evil"
    with CasClient(channel) as cas:
        cas.upload(blobs)
    with LayerClient(channel) as layers:
        layers.put(key, BlobId.of(directories[-1].SerializeToString()))


def _dir(
    files: dict[str, bytes] | None = None,
    symlinks: dict[str, str] | None = None,
    dirs: dict[str, re_pb2.Directory] | None = None,
    executable: bool = False,
) -> re_pb2.Directory:
    d = re_pb2.Directory()
    for name, data in (files or {}).items():
        d.files.add(name=name, digest=BlobId.of(data).to_proto(), is_executable=executable)
    for name, target in (symlinks or {}).items():
        d.symlinks.add(name=name, target=target)
    for name, sub in (dirs or {}).items():
        d.directories.add(name=name, digest=BlobId.of(sub.SerializeToString()).to_proto())
    return d


EVIL = b"evil"
MALICIOUS = {
    "dotdot-file": [_dir(files={"..": EVIL})],
    "slash-file": [_dir(files={"../outside": EVIL})],
    "absolute-name": [_dir(files={"/tmp/outside": EVIL})],
    "dot-dir": [_dir(), _dir(dirs={".": _dir()})],
    "dotdot-dir": [_dir(files={"x": EVIL}), _dir(dirs={"..": _dir(files={"x": EVIL})})],
    "empty-name": [_dir(files={"": EVIL})],
    "nul-name": [_dir(files={"a\0b": EVIL})],
    "link-then-dir": [
        _dir(files={"x": EVIL}),
        _dir(symlinks={"a": "../outside"}, dirs={"a": _dir(files={"x": EVIL})}),
    ],
    "nested-slash": [_dir(symlinks={"a/b": "c"}), _dir(dirs={"ok": _dir(symlinks={"a/b": "c"})})],
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_trees_are_refused(
    case: str, channel: grpc.Channel, tmp_path: pathlib.Path
) -> None:
    _put_raw_tree(channel, f"evil-{case}", MALICIOUS[case])
    target = tmp_path / "deep" / "target"
    target.mkdir(parents=True)
    before = snapshot(tmp_path)
    with LayerClient(channel) as layers, pytest.raises(UnsafeTree):
        layers.restore(f"evil-{case}", into=target)
    assert snapshot(tmp_path) == before  # nothing written, inside the target or out


def test_strict_symlinks_refuse_escaping_links(
    channel: grpc.Channel, tmp_path: pathlib.Path
) -> None:
    _put_raw_tree(channel, "links", [_dir(symlinks={"abs": "/etc", "up": "../../x", "ok": "a/b"})])
    with (
        LayerClient(channel, strict_symlinks=True) as layers,
        pytest.raises(UnsafeTree, match="outside"),
    ):
        layers.restore("links", into=tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with LayerClient(channel) as layers:  # by default link targets are data: kept as they are
        layers.restore("links", into=tmp_path / "t")
    assert os.readlink(tmp_path / "t" / "abs") == "/etc"


def test_existing_symlinks_in_the_target_are_never_followed(
    channel: grpc.Channel, tmp_path: pathlib.Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep")
    target = tmp_path / "target"
    target.mkdir()
    (target / "d").symlink_to(outside)  # where the tree has a directory
    (target / "secret").symlink_to(outside / "secret")  # where the tree has a file
    sub = _dir(files={"secret": EVIL})
    _put_raw_tree(channel, "swap", [sub, _dir(files={"secret": EVIL}, dirs={"d": sub})])
    with LayerClient(channel) as layers:
        layers.restore("swap", into=target)
    assert (outside / "secret").read_text() == "keep"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not (target / "d").is_symlink() and (target / "d" / "secret").read_bytes() == EVIL
    assert not (target / "secret").is_symlink() and (target / "secret").read_bytes() == EVIL


def test_incomplete_tree_is_refused_by_the_server(channel: grpc.Channel) -> None:
    root = _dir(files={"x": b"never uploaded"})
    with CasClient(channel) as cas:
        cas.upload({BlobId.of(root.SerializeToString()): root.SerializeToString()})
    with LayerClient(channel) as layers, pytest.raises(Exception, match="FAILED_PRECONDITION"):
        layers.put("partial", BlobId.of(root.SerializeToString()))


def test_layer_with_evicted_blobs_is_passed_over(tmp_path: pathlib.Path) -> None:
    from tests.support.reapi import Reapi
    from tests.support.server_process import ServerProcess

    server = ServerProcess(tmp_path / "store", ["--max-size", "300K"]).start()
    try:
        with grpc.insecure_channel(server.address) as channel, LayerClient(channel) as layers:
            src = tmp_path / "src"
            src.mkdir()
            (src / "f").write_bytes(b"old layer " * 1000)
            layers.save([pathlib.Path("f")], "deps-1", base=src)
            time.sleep(0.01)
            (src / "f").write_bytes(os.urandom(120_000))
            layers.save([pathlib.Path("f")], "deps-2", base=src)
            # Refresh deps-1 so that deps-2's big blob is the oldest, then
            # push it out of the bounded store with other uploads.
            assert layers.lookup("deps-1", []) is not None
            Reapi(channel).upload(os.urandom(100_000))
            Reapi(channel).upload(os.urandom(100_000))
            assert layers.lookup("deps-2", []) is None  # incomplete: not a hit
            got = layers.restore("deps-2", ["deps-"], tmp_path / "out")
            assert (got.hit, got.key) == ("partial", "deps-1")
            assert (tmp_path / "out" / "f").read_bytes() == b"old layer " * 1000
    finally:
        server.stop()


def test_permission_bits_round_trip(channel: grpc.Channel, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    modes = {"private": 0o600, "group": 0o640, "tool": 0o755, "own-tool": 0o700, "suid": 0o4750}
    for name, mode in modes.items():
        (src / name).write_text(name)
        (src / name).chmod(mode)
    (src / "same-content").write_text("private")  # one blob, two modes
    (src / "same-content").chmod(0o644)
    old_umask = os.umask(0o077)  # restore sets modes exactly, whatever the umask
    try:
        with LayerClient(channel) as layers:
            layers.save([pathlib.Path(".")], "modes", base=src)
            layers.restore("modes", into=tmp_path / "out")
            got = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
            assert got == {**modes, "suid": 0o750, "same-content": 0o644}  # setuid dropped
            # The right content under the wrong mode is fixed in place, not rewritten.
            (tmp_path / "out" / "private").chmod(0o666)
            again = layers.restore("modes", into=tmp_path / "out")
            assert again.written_files == 0
            assert stat.S_IMODE((tmp_path / "out" / "private").stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


def _outside_file(tmp_path: pathlib.Path, content: bytes) -> pathlib.Path:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret"
    secret.write_bytes(content)
    secret.chmod(0o600)
    return secret


@pytest.mark.parametrize("content", [EVIL, b"other content"])
def test_planted_hard_links_are_replaced_not_changed(
    content: bytes, channel: grpc.Channel, tmp_path: pathlib.Path
) -> None:
    secret = _outside_file(tmp_path, content)
    target = tmp_path / "target"
    (target / "d").mkdir(parents=True)
    os.link(secret, target / "secret")  # where the tree has an executable file
    os.link(secret, target / "d" / "secret")
    sub = _dir(files={"secret": EVIL}, executable=True)
    _put_raw_tree(channel, "hard", [sub, _dir(files={"secret": EVIL}, dirs={"d": sub})])
    _put_raw_tree(channel, "hard-x", [_dir(files={"secret": EVIL}, executable=True)])
    with LayerClient(channel) as layers:
        layers.restore("hard", into=target)
        layers.restore("hard-x", into=target)
    assert secret.read_bytes() == content
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.stat().st_nlink == 1
    for restored in (target / "secret", target / "d" / "secret"):
        st = restored.lstat()
        assert (restored.read_bytes(), stat.S_IMODE(st.st_mode), st.st_nlink) == (EVIL, 0o755, 1)


def test_planted_symlinks_with_matching_content_are_not_followed(
    channel: grpc.Channel, tmp_path: pathlib.Path
) -> None:
    secret = _outside_file(tmp_path, EVIL)
    target = tmp_path / "target"
    target.mkdir()
    (target / "secret").symlink_to(secret)  # a file component
    (target / "d").symlink_to(secret.parent)  # a directory component
    sub = _dir(files={"secret": EVIL}, executable=True)
    _put_raw_tree(channel, "soft", [sub, _dir(files={"secret": EVIL}, dirs={"d": sub})])
    before = snapshot(secret.parent)
    with LayerClient(channel) as layers:
        layers.restore("soft", into=target)
    assert snapshot(secret.parent) == before == {"secret": ("file", _sha(EVIL), "0o600")}
    assert not (target / "d").is_symlink() and not (target / "secret").is_symlink()
    assert snapshot(target) == {
        "d": ("dir",),
        "d/secret": ("file", _sha(EVIL), "0o755"),
        "secret": ("file", _sha(EVIL), "0o644"),
    }


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
