"""Properties of the registry's path and header parsing: whatever comes in, a Target or
an HttpError, never a path trick let through or an exception of another kind."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from hypothesis import given
from hypothesis import strategies as st

from slipstream.cache_server.services.common import Backend, HttpError
from slipstream.cache_server.services.http_oci import _NAME_COMPONENT, OciRegistry
from slipstream.cache_server.storage.memory import MemoryStore

SEGMENT_TEXT = st.text(alphabet="abcAZ09._-~:%/ \\", max_size=12)
WORDS = st.sampled_from(["blobs", "uploads", "manifests", "tags", "list", "referrers", "..", "."])
# Parsing touches neither the store nor the executor (which starts no thread unused).
REGISTRY = OciRegistry(Backend(MemoryStore(None), ThreadPoolExecutor(1)))


@given(segments=st.lists(st.one_of(SEGMENT_TEXT, WORDS), max_size=7))
def test_a_path_parses_to_a_valid_target_or_is_refused(segments: list[str]) -> None:
    shown = "/v2/" + "/".join(segments)
    try:
        target = REGISTRY.parse(REGISTRY.check_segments(segments, shown), shown)
    except HttpError as exc:
        assert exc.status in (400, 404) and exc.code
        return
    assert ".." not in segments and "." not in segments
    if target.instance:
        assert all(_NAME_COMPONENT.fullmatch(c) for c in target.instance.split("/"))
    assert not any(c in target.key for c in "/%\\ ")


@given(
    size=st.integers(min_value=0, max_value=10_000),
    start=st.one_of(st.none(), st.integers(min_value=0, max_value=20_000)),
    end=st.one_of(st.none(), st.integers(min_value=0, max_value=20_000)),
)
def test_a_range_is_within_the_blob_or_416(size: int, start: int | None, end: int | None) -> None:
    header = f"bytes={'' if start is None else start}-{'' if end is None else end}"
    try:
        first, stop = OciRegistry._range(header, size)
    except HttpError as exc:
        assert exc.status == 416 and exc.code == "RANGE_INVALID"
        return
    assert 0 <= first < stop <= size
    if start is not None:
        assert first == start
        assert stop == (size if end is None else min(size, end + 1))
    else:
        assert end is not None and stop == size and stop - first == min(size, end)
