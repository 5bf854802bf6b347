"""A record listing with a limit: at most that many, drawn from the full listing, in key
order, on the disk and memory stores (the S3 store's is in tests/s3/test_s3_store.py)."""

from __future__ import annotations

import pathlib
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.cache_server.storage.base import Store
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.memory import MemoryStore

_KEYS = st.sets(st.text(alphabet="ab/.%-", min_size=1, max_size=6), max_size=30)


def _check_limited_listing(store: Store, keys: set[str], prefix: str, limit: int) -> None:
    for key in keys:
        store.put_record("timings", key, key.encode())
    whole = [r.key for r in store.list_records("timings", prefix)]
    assert whole == sorted(k for k in keys if k.startswith(prefix))
    limited = [r.key for r in store.list_records("timings", prefix, limit)]
    assert len(limited) == min(limit, len(whole))
    assert limited == sorted(limited)
    assert set(limited) <= set(whole)


@settings(max_examples=100, deadline=None)
@given(keys=_KEYS, prefix=st.sampled_from(["", "a", "a/", "b"]), limit=st.integers(0, 35))
def test_a_limited_listing_on_disk(keys: set[str], prefix: str, limit: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _check_limited_listing(DiskStore(pathlib.Path(tmp), sync=False), keys, prefix, limit)


@settings(max_examples=100, deadline=None)
@given(keys=_KEYS, prefix=st.sampled_from(["", "a", "a/", "b"]), limit=st.integers(0, 35))
def test_a_limited_listing_in_memory(keys: set[str], prefix: str, limit: int) -> None:
    _check_limited_listing(MemoryStore(), keys, prefix, limit)


def test_keys_of_dots_are_records_like_any_other(tmp_path: pathlib.Path) -> None:
    """Record keys "." and "..", not the directory and its parent: each is stored,
    read back and listed (the disk store once tried to rename a file over its own
    namespace directory for them)."""
    for store in (DiskStore(tmp_path / "disk", sync=False), MemoryStore()):
        keys = [".", "..", ".a", "a."]
        for key in keys:
            assert store.put_record("layers", key, key.encode())
        assert [store.get_record("layers", key) for key in keys] == [k.encode() for k in keys]
        assert [r.key for r in store.list_records("layers", ".")] == [".", "..", ".a"]
        store.delete_record("layers", "..")
        assert [r.key for r in store.list_records("layers")] == [".", ".a", "a."]
