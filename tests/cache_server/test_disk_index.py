"""The accountant's index (LocalIndex.apply) against a model of an LRU with a bound: any
sequence of workers' reports keeps the order, the byte count and the files in step."""

from __future__ import annotations

import pathlib
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.cache_server.storage.disk_index import (
    ADMITTED,
    FORGOTTEN,
    TOUCHED,
    LocalIndex,
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

    def report(self, kind: str, rel: str, size: int) -> None:
        if kind == FORGOTTEN:
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
    reports: list[tuple[str, str, int]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for kind in ("cas", "records"):
            (root / kind).mkdir()
        index = LocalIndex(root, BOUND, BLOCK)
        model = Model()
        for kind, rel, size in reports:
            if kind == ADMITTED:  # the worker put the file in place, then reported it
                (root / rel).parent.mkdir(exist_ok=True)
                (root / rel).write_bytes(b"x" * size)
            index.apply([(kind, rel, size if kind == ADMITTED else 0)])
            model.report(kind, rel, size)
            assert list(index._lru) == list(model.lru)
            entries, used, _ = index.figures()
            assert (entries, used) == (len(model.lru), model.taken())
            assert used <= BOUND or entries == 1
            on_disk = {str(p.relative_to(root)) for p in (root / "cas").rglob("blob*")}
            assert on_disk == set(model.files)
