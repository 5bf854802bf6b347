"""KeyedBlobs: keys taken on trust, pointing at CAS blobs, with a few metadata strings."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.cache_server.services.http_common import KeyedBlobs
from slipstream.cache_server.storage.memory import MemoryStore
from slipstream.core.digests import BlobId

_KEYS = st.text("abcdefghij0123456789/._-", min_size=1, max_size=60)
_METADATA = st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=80), max_size=4)


@settings(max_examples=200, deadline=None)
@given(key=_KEYS, data=st.binary(max_size=2000), metadata=_METADATA)
def test_an_entry_reads_back_with_its_metadata(
    key: str, data: bytes, metadata: dict[str, str]
) -> None:
    entries = KeyedBlobs(MemoryStore(), "turborepo")
    assert entries.put_bytes(key, data, metadata)
    assert entries.find(key) == (BlobId.of(data), metadata)
    opened = entries.open_with_metadata(key)
    assert opened is not None and opened[0] == (BlobId.of(data), data) and opened[1] == metadata


@settings(max_examples=100, deadline=None)
@given(key=_KEYS, first=st.binary(max_size=500), second=st.binary(max_size=500))
def test_put_if_absent_keeps_the_first_entry_until_it_is_evicted(
    key: str, first: bytes, second: bytes
) -> None:
    store = MemoryStore(max_size=8192)
    entries = KeyedBlobs(store, "nx")
    assert entries.put_bytes(key, first, overwrite=False)
    assert not entries.put_bytes(key, second, overwrite=False)
    assert entries.lookup(key) == BlobId.of(first)
    # Something newer pushes the entry out: its key is missing, and a new entry may take it.
    filler = b"f" * 8150 + first[:40]  # with any key record, over the bound
    store.put_blob(BlobId.of(filler), filler)
    assert entries.lookup(key) is None
    assert entries.put_bytes(key, second, overwrite=False)
    assert entries.lookup(key) == BlobId.of(second)


def test_a_record_that_is_not_a_pointer_reads_as_missing_and_is_dropped() -> None:
    store = MemoryStore()
    entries = KeyedBlobs(store, "sccache")
    for junk in (b"", b"zz/1", b"%s/3\nnot json" % (b"a" * 64), b"%s/3\n[1]" % (b"a" * 64)):
        store.put_record("sccache", "k", junk)
        assert entries.find("k") is None
        assert store.get_record("sccache", "k") is None
