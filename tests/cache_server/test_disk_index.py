"""The disk store's index. The accountant's (LocalIndex.apply) against a model of an LRU
with a bound: any sequence of workers' reports keeps the order, the byte count and the
files in step. An index loading while the store changes: the merge of the scan with the
changes made meanwhile, and what the index holds once loaded."""

from __future__ import annotations

import collections
import os
import pathlib
import tempfile
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.cache_server.storage import disk_index
from slipstream.cache_server.storage.disk_index import (
    ADMITTED,
    FORGOTTEN,
    TOUCHED,
    LocalIndex,
    Scanned,
    merge_scan,
    ordered_scan,
    scan_entries,
    space_taken,
)

BLOCK = 16  # a tiny filesystem block, so that the bound counts sizes and blocks
BOUND = 600
RELS = [f"cas/0{i}/blob{i}" for i in range(6)]

reports = st.lists(
    st.tuples(
        st.sampled_from([ADMITTED, TOUCHED, FORGOTTEN]),
        st.sampled_from(RELS),
        st.integers(min_value=1, max_value=60),
        st.booleans(),  # a FORGOTTEN's file removed first (False: a write put it back)
    ),
    max_size=60,
)


class Model:
    """An LRU with a bound over a dict of files, as the accountant should keep it."""

    def __init__(self) -> None:
        self.lru: dict[str, int] = {}  # insertion order is the LRU order, oldest first
        self.files: dict[str, int] = {}  # what is on disk

    def taken(self) -> int:
        return sum(space_taken(size, BLOCK) for size in self.lru.values())

    def report(self, kind: str, rel: str, size: int, removed: bool = True) -> None:
        if kind == FORGOTTEN:
            if removed:
                self.files.pop(rel, None)
            if rel not in self.files:  # a file there again stays indexed
                self.lru.pop(rel, None)
            return
        if kind == TOUCHED:
            if rel in self.lru:
                self.lru[rel] = self.lru.pop(rel)
                return
            if rel not in self.files:
                return
            size = self.files[rel]  # an entry the index lacked: looked up on disk
        else:
            self.files[rel] = size
        self.lru.pop(rel, None)
        self.lru[rel] = size
        while self.taken() > BOUND and next(iter(self.lru)) != rel:
            oldest = next(iter(self.lru))
            del self.lru[oldest]
            self.files.pop(oldest, None)


@settings(max_examples=80, deadline=None)
@given(reports=reports)
def test_reports_keep_the_lru_the_bound_and_the_files_in_step(
    reports: list[tuple[str, str, int, bool]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for kind in ("cas", "records"):
            (root / kind).mkdir()
        index = LocalIndex(root, BOUND, BLOCK)
        model = Model()
        for kind, rel, size, removed in reports:
            if kind == ADMITTED:  # the worker put the file in place, then reported it
                (root / rel).parent.mkdir(exist_ok=True)
                (root / rel).write_bytes(b"x" * size)
            elif kind == FORGOTTEN and removed:  # removed, or found gone, then reported
                (root / rel).unlink(missing_ok=True)
            index.apply([(kind, rel, size if kind == ADMITTED else 0)])
            model.report(kind, rel, size, removed)
            assert list(index._lru) == list(model.lru)
            entries, used, _ = index.figures()
            assert (entries, used) == (len(model.lru), model.taken())
            assert used <= BOUND or entries == 1
            on_disk = {str(p.relative_to(root)) for p in (root / "cas").rglob("blob*")}
            assert on_disk == set(model.files)


# ---- an index loading while the store changes ----
ENTRY_SIZES = st.integers(min_value=1, max_value=60)
entry_maps = st.dictionaries(
    st.sampled_from(RELS), st.tuples(ENTRY_SIZES, st.floats(0, 1e6)), max_size=len(RELS)
)


@settings(max_examples=200, deadline=None)
@given(scanned=entry_maps, live=entry_maps, removed=st.sets(st.sampled_from(RELS)))
def test_the_merge_is_the_scan_with_the_live_changes_over_it(
    scanned: dict[str, tuple[int, float]],
    live: dict[str, tuple[int, float]],
    removed: set[str],
) -> None:
    """What the scan saw stands unless the entry was removed or is live meanwhile; live
    entries win and come last (most recently used), in their order; the space counted is
    that of the entries merged."""
    ordered, taken = ordered_scan(
        Scanned(list(scanned), [s for s, _ in scanned.values()], [t for _, t in scanned.values()]),
        BLOCK,
    )
    assert list(ordered) == sorted(scanned, key=lambda rel: scanned[rel][1])
    used = merge_scan(ordered, taken, collections.OrderedDict(live), removed, BLOCK)
    kept = [rel for rel in sorted(scanned, key=lambda r: scanned[r][1]) if rel not in live]
    kept = [rel for rel in kept if rel not in removed]
    assert list(ordered) == kept + list(live)
    assert dict(ordered) == {**{rel: scanned[rel] for rel in kept}, **live}
    assert used == sum(space_taken(size, BLOCK) for size, _ in ordered.values())


changes = st.lists(
    st.tuples(
        st.sampled_from(["write", "remove", "find", "read"]), st.sampled_from(RELS), ENTRY_SIZES
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    initial=st.dictionaries(st.sampled_from(RELS), ENTRY_SIZES),
    steps=changes,
    scan_at=st.lists(st.integers(0, 40), min_size=len(RELS), max_size=len(RELS)),
    bounded=st.booleans(),
)
def test_an_index_loaded_while_the_store_changes_counts_the_files_left(
    initial: dict[str, int], steps: list[tuple[str, str, int]], scan_at: list[int], bounded: bool
) -> None:
    """The scan looks at each file at its own moment (scan_at) among writes, removals,
    finds and reads made through the index as the store makes them; finds are right
    all along; once the scan is merged, the index holds exactly the files on disk with
    their sizes, counts exactly their space, and holds the bound."""
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for rel in RELS:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        for rel, size in initial.items():
            (root / rel).write_bytes(b"x" * size)
            os.utime(root / rel, (1000.0 + size, 1000.0 + size))
        index = LocalIndex(root, BOUND // 3 if bounded else None, BLOCK)
        assert index._begin_loading(None)
        seen = Scanned([], [], [])
        for position in range(len(steps) + 1):
            for rel, at in zip(RELS, scan_at, strict=True):
                if min(at, len(steps)) == position and (root / rel).exists():
                    stat = (root / rel).stat()
                    seen.rels.append(rel)
                    seen.sizes.append(stat.st_size)
                    seen.mtimes.append(stat.st_mtime)
            if position == len(steps):
                break
            kind, rel, size = steps[position]
            path = root / rel
            if kind == "write":  # as DiskStore._install: in place, then admitted
                path.write_bytes(b"y" * size)
                index.admit(rel, size)
            elif kind == "remove":  # as DiskStore.delete_record
                path.unlink(missing_ok=True)
                index.forget(rel)
            elif kind == "find":
                held = path.exists() and path.stat().st_size == size
                assert index.present([rel], [size]) == [held]
            elif path.exists():  # a read: the file touched, or found gone
                index.touched([rel])
            else:
                index.forget(rel)
            assert index.loading
        index._finish_load(seen)
        assert index.loaded
        on_disk = {
            str(p.relative_to(root)): p.stat().st_size for p in root.rglob("blob*") if p.is_file()
        }
        assert {rel: size for rel, (size, _) in index._lru.items()} == on_disk
        entries, used, _ = index.figures()
        assert (entries, used) == (
            len(on_disk),
            sum(space_taken(s, BLOCK) for s in on_disk.values()),
        )
        if bounded:
            assert used <= BOUND // 3


def test_a_file_removed_while_a_find_looks_it_up_is_not_indexed(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A find during the load looks up an entry it does not know outside the index's
    lock; the entry removed between that lookup and the find's answer is not taken in."""
    rel = RELS[0]
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes(b"x" * 10)
    (tmp_path / "cas").mkdir(exist_ok=True)
    (tmp_path / "records").mkdir()
    index = LocalIndex(tmp_path, None, BLOCK)
    assert index._begin_loading(None)
    real_stat = os.stat

    def stat_then_removed(path: str, *args: object, **kwargs: object) -> os.stat_result:
        found = real_stat(path, *args, **kwargs)  # type: ignore[arg-type]
        if str(path).endswith(rel):  # another thread removes it meanwhile
            os.unlink(path)
            index.forget(rel)
        return found

    monkeypatch.setattr(os, "stat", stat_then_removed)
    assert index.present([rel], [10]) == [False]
    monkeypatch.setattr(os, "stat", real_stat)
    index._finish_load(scan_entries(tmp_path))
    assert rel not in index._lru and index.figures()[:2] == (0, 0)


@pytest.mark.parametrize("background", [True, False])
def test_a_load_that_fails_is_tried_again_until_it_succeeds(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    """A scan that fails (here cas/ is a file, not a directory) leaves the index loading,
    answering from the files and keeping the changes; it is tried again in the
    background, and once the directory can be read the index loads with exact figures.
    A load in the caller's thread raises its first failure."""
    monkeypatch.setattr(disk_index, "LOAD_RETRY_SECONDS", (0.05,))
    (tmp_path / "records").mkdir()
    (tmp_path / "cas").write_bytes(b"not a directory")
    index = LocalIndex(tmp_path, None, BLOCK)
    try:
        if background:
            index.start_loading()
        else:
            with pytest.raises(NotADirectoryError):
                index.load()
        time.sleep(0.2)  # a few failed attempts
        assert index.loading
        staging = tmp_path / "staging"  # put in place at once: a scan sees all or nothing
        for rel, size in ((RELS[0], 10), (RELS[1], 20)):
            path = staging / pathlib.Path(rel).relative_to("cas")
            path.parent.mkdir(parents=True)
            path.write_bytes(b"x" * size)
        assert index.present([RELS[0]], [10]) == [False]
        (tmp_path / "cas").unlink()
        staging.rename(tmp_path / "cas")
        assert index.present([RELS[0]], [10]) == [True]  # from the file, or the index
        deadline = time.monotonic() + 10
        while not index.loaded:
            assert time.monotonic() < deadline, "the index never loaded"
            time.sleep(0.02)
        assert index.figures()[:2] == (2, space_taken(10, BLOCK) + space_taken(20, BLOCK))
    finally:
        index.close()


def test_closing_the_index_stops_the_attempts_of_a_failing_load(tmp_path: pathlib.Path) -> None:
    (tmp_path / "cas").write_bytes(b"not a directory")
    index = LocalIndex(tmp_path, None, BLOCK)
    before = set(threading.enumerate())
    index.start_loading()
    index.close()
    loader = [t for t in set(threading.enumerate()) - before if t.name == "index-load"]
    for thread in loader:
        thread.join(timeout=5)
        assert not thread.is_alive()
    assert index.loading


def test_a_read_that_finds_a_file_gone_keeps_the_entry_of_a_write_landing_meanwhile(
    tmp_path: pathlib.Path,
) -> None:
    """A read finds the file gone; before it tells the index, a write puts the file in
    place and admits it. The entry stays (dropping it would leave a file the index never
    counts nor evicts); a file really gone is dropped."""
    rel = RELS[0]
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / "records").mkdir()
    index = LocalIndex(tmp_path, BOUND, BLOCK)
    index.load()
    (tmp_path / rel).write_bytes(b"x" * 10)  # the write, after the read looked
    index.admit(rel, 10)
    index.forget(rel)  # the read, late
    assert index.present([rel], [10]) == [True]
    assert index.figures()[:2] == (1, space_taken(10, BLOCK))
    (tmp_path / rel).unlink()
    index.forget(rel)
    assert index.present([rel]) == [False] and index.figures()[:2] == (0, 0)


def test_a_load_held_until_an_event_keeps_the_changes_and_scans_after_it(
    tmp_path: pathlib.Path,
) -> None:
    """start_loading(after=event), as the supervisor of workers holds its scan until they
    serve: loading at once (a write meanwhile is kept, nothing is scanned), then loaded
    with exact figures once the event is set."""
    for rel in RELS[:2]:
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_bytes(b"x" * 10)
    (tmp_path / "records").mkdir()
    serving = threading.Event()
    index = LocalIndex(tmp_path, None, BLOCK)
    index.start_loading(after=serving)
    time.sleep(0.2)
    (tmp_path / RELS[2]).parent.mkdir(parents=True)
    (tmp_path / RELS[2]).write_bytes(b"x" * 20)
    index.admit(RELS[2], 20)
    assert index.loading and index.figures()[:2] == (1, space_taken(20, BLOCK))  # no scan
    serving.set()
    deadline = time.monotonic() + 10
    while not index.loaded:
        assert time.monotonic() < deadline, "the index never loaded"
        time.sleep(0.02)
    assert index.figures()[:2] == (3, 2 * space_taken(10, BLOCK) + space_taken(20, BLOCK))
