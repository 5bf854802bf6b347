"""The plugin's two-stage choice, in process: every collected test in exactly one shard.

Each shard collects only the files the plan gives it plus files the timings do not
know, so each sees a different part of the suite; this checks the pieces still fit.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.pytest_plugin import Sharding, plan_known, select
from slipstream.splitter.history import Run, Sample
from slipstream.splitter.ids import file_of
from slipstream.splitter.sources import TimingSource

_files = st.sampled_from([f"tests/test_{c}.py" for c in "abcdefg"])
_tests = st.builds(lambda f, n: f"{f}::test_{n}", _files, st.integers(0, 30))


@settings(max_examples=120, deadline=None)
@given(
    known=st.dictionaries(_tests, st.floats(0.001, 20.0), min_size=1, max_size=40),
    deleted=st.sets(_tests, max_size=10),
    added=st.sets(_tests, max_size=15),
    groups=st.dictionaries(_tests, st.sampled_from(["g1", "g2"]), max_size=6),
    total=st.integers(1, 6),
    by=st.sampled_from(["auto", "test", "class", "file"]),
)
def test_every_collected_test_lands_in_exactly_one_shard(known, deleted, added, groups, total, by):
    runs = [Run("r", 1, {t: Sample(s, False) for t, s in known.items()}, {}, None, {})]
    current = (set(known) - deleted) | added  # the suite as it is now
    present_files = {file_of(t) for t in current}
    still_known = {t for t in known if file_of(t) in present_files}
    owner: dict[str, int] = {}
    for index in range(total):
        s = Sharding(index, total, by, TimingSource(), runs=runs)
        if still_known:
            plan_known(s, still_known)
        # What this shard collects: files the plan gives it, and files it does not know.
        visible = [t for t in sorted(current) if index in s.owners.get(file_of(t), [index])]
        for t in select(s, visible, groups):
            assert t not in owner, f"{t} in shards {owner[t]} and {index}"
            owner[t] = index
    assert set(owner) == current
