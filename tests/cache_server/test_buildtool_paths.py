"""How the build tools' front ends name entries: every accepted path is a storable key,
and different namespaces or paths never share one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slipstream.cache_server.services.common import Backend, HttpError
from slipstream.cache_server.services.http_common import SEGMENT
from slipstream.cache_server.services.http_sccache import MAX_DEPTH, SccacheWebdav
from slipstream.cache_server.services.http_turborepo import TurborepoCache
from slipstream.cache_server.storage.base import encode_record_key
from slipstream.cache_server.storage.memory import MemoryStore

_BACKEND = Backend(MemoryStore(), ThreadPoolExecutor(1))
_SEGMENTS = st.lists(
    st.text("abcXYZ019_.~-", min_size=1, max_size=40).filter(lambda s: s not in (".", "..")),
    max_size=MAX_DEPTH + 3,
)
_TEAMS = st.one_of(st.just(""), st.text("abcXYZ019_.~-", min_size=1, max_size=30))
_HASHES = st.text("0123456789abcdef", min_size=1, max_size=40)


@given(segments=_SEGMENTS)
def test_an_sccache_path_is_its_key_or_a_400(segments: list[str]) -> None:
    front_end = SccacheWebdav(_BACKEND)
    try:
        target = front_end.parse(segments, "/sccache/...")
    except HttpError as exc:
        assert exc.status == 400
        too_long = len("/".join(segments)) > 60 or len(segments) > MAX_DEPTH
        assert too_long, exc.message
        return
    assert target.key == "/".join(segments)
    assert len(segments) <= MAX_DEPTH
    if target.key:
        encode_record_key("sccache", target.key)  # storable


@given(a=st.tuples(_TEAMS, _HASHES), b=st.tuples(_TEAMS, _HASHES))
def test_turborepo_teams_and_hashes_never_share_a_key(
    a: tuple[str, str], b: tuple[str, str]
) -> None:
    front_end = TurborepoCache(_BACKEND)

    def key(team: str, hash_: str) -> str:
        query = {"teamId": team} if team else {}
        target = front_end.parse_request(["artifacts", hash_], "/v8/...", query)
        assert target.instance == team and SEGMENT.fullmatch(hash_)
        return TurborepoCache.key(target.instance, target.key)

    assert (key(*a) == key(*b)) == (a == b)


@pytest.mark.parametrize("team", ["a b", "x" * 101, "t/u"])
def test_a_team_that_is_not_a_segment_is_refused(team: str) -> None:
    with pytest.raises(HttpError) as err:
        TurborepoCache(_BACKEND).parse_request(["artifacts", "abcd"], "/v8", {"slug": team})
    assert err.value.status == 400
