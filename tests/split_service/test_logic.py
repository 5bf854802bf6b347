"""The pure core of the split service: pinned plans, the fallback split, the lease
scheduler (properties with hypothesis) and batch sizing."""

from __future__ import annotations

import collections
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.splitter.algorithm import build_units
from slipstream.splitter.history import Estimates, Sample
from slipstream.splitter.pinning import (
    PinnedPlan,
    check_request,
    fallback_shard,
    ids_digest,
    make_plan,
    mismatch,
    plan_key,
    run_slug,
)
from slipstream.splitter.queue import (
    DEFAULT_FACTOR,
    Batch,
    Completion,
    Finished,
    Grant,
    Lease,
    QueuePlan,
    Wait,
    abandoned_tests,
    batch_target,
    completed_results,
    lease_seconds,
    make_batches,
    make_queue,
    next_lease,
)

TESTS = [f"tests/test_{f}.py::test_{i}" for f in "abcd" for i in range(10)]


def queue_of(times: dict[str, float], runners: int) -> QueuePlan:
    units = build_units(times, runners, "test")
    return make_queue("run", units, runners, ids_digest(times))


# ---- pinned plans and the fallback ----


def test_plan_record_round_trips_and_mismatch_names_the_difference():
    est = Estimates({t: 1.0 + i for i, t in enumerate(TESTS)}, {}, True, len(TESTS))
    plan = make_plan("run-1", TESTS, 3, est)
    assert PinnedPlan.from_bytes(plan.to_bytes()) == plan
    assert plan.all_tests() == set(TESTS)
    assert mismatch(TESTS, TESTS[::-1], "the plan") is None
    message = mismatch(TESTS, [*TESTS[2:], "tests/new.py::test_x"], "the plan")
    assert message is not None and "\n" not in message
    assert "2 planned but not collected here" in message
    assert "1 collected here but not planned (e.g. tests/new.py::test_x)" in message


def test_plan_keys_and_request_checks():
    def key(run_key: str, total: int, owner: str = "ci-main") -> str:
        return plan_key(run_slug("s", run_key, owner), total)

    assert key("run 1", 3) != key("run 2", 3) != key("run 1", 4)
    # A run belongs to its caller: another token's run of the same key is another run.
    assert key("run 1", 3) != key("run 1", 3, owner="ci-pr")
    assert len(key("x" * 500, 3)) < 100
    for total, index, gran in ((0, 0, ""), (3, 3, ""), (3, -1, ""), (3, 0, "module")):
        with pytest.raises(ValueError):
            check_request(total, index, gran)
    assert check_request(3, 2, "") == "auto"
    with pytest.raises(ValueError):
        run_slug("s", "", "ci-main")


@pytest.mark.parametrize("with_timings", [False, True])
def test_fallback_partitions_the_tests_between_runners(with_timings):
    est = Estimates({t: float(i % 7) + 0.1 for i, t in enumerate(TESTS)}, {}, True, 40)
    groups = {TESTS[0]: "g", TESTS[25]: "g"}
    shards = [
        fallback_shard(
            reversed(TESTS), i, 4, estimates=est if with_timings else None, groups=groups
        )
        for i in range(4)
    ]
    ran = collections.Counter(t for tests, _ in shards for t in tests)
    assert sorted(ran) == sorted(TESTS) and set(ran.values()) == {1}
    assert len({h for _, h in shards}) == 1  # every runner computes the same plan
    owner = {t: i for i, (tests, _) in enumerate(shards) for t in tests}
    assert owner[TESTS[0]] == owner[TESTS[25]]  # a group stays together


# ---- batches ----


def test_batches_run_longest_first_and_shrink():
    times = {f"t{i:02d}": float(i) for i in range(1, 41)}
    batches = make_batches(build_units(times, 4, "test"), 4)
    flat = [t for b in batches for t in b.tests]
    assert sorted(flat) == sorted(times) and len(flat) == len(set(flat))
    assert flat[0] == "t40" and flat[-1] == "t01"
    assert batches[0].predicted <= sum(times.values()) / (2 * 4)
    assert batches[-1].predicted < batches[0].predicted / 5
    even = make_batches(build_units({f"t{i}": 1.0 for i in range(400)}, 4, "test"), 4)
    assert len(even[0].tests) == 50 and len(even[-1].tests) == 1
    assert len(even) < 60  # round trips stay few


@given(
    st.lists(st.floats(0.001, 100.0), min_size=1, max_size=60),
    st.integers(1, 8),
    st.floats(0.0, 5.0),
)
@settings(max_examples=150, deadline=None)
def test_batches_cover_every_unit_once_and_shrink(durations, runners, min_seconds):
    times = {f"t{i}": d for i, d in enumerate(durations)}
    units = build_units(times, runners, "test")
    batches = make_batches(units, runners, min_seconds=min_seconds)
    flat = [t for b in batches for t in b.tests]
    assert sorted(flat) == sorted(times)
    assert all(b.tests for b in batches)
    # Longest first; targets never grow; a batch overshoots its target only when
    # its first unit alone does.
    assert [times[t] for t in flat] == sorted((times[t] for t in flat), reverse=True)
    remaining = sum(u.weight for u in units)
    targets = []
    for b in batches:
        target = batch_target(remaining, runners, DEFAULT_FACTOR, min_seconds)
        assert b.predicted <= max(target, times[b.tests[0]]) + 1e-9
        targets.append(target)
        remaining -= b.predicted
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(targets))


# ---- leases ----


def test_an_expired_lease_goes_back_then_is_abandoned_after_max_attempts():
    q = QueuePlan("run", 1, (Batch(0, ("a", "b"), 5.0), Batch(1, ("c",), 1.0)), "h", "d")
    first = next_lease(q, [], {}, 0.0)
    assert isinstance(first, Grant) and first.attempt == 0
    lease = Lease(first.batch, 0, first.tests, "r0", 0.0, 10.0)
    # Not expired: the next batch (or a wait when none is left).
    nxt = next_lease(q, [lease], {}, 5.0)
    assert not (isinstance(nxt, Grant) and nxt.batch == first.batch)
    # Part of it completed, then it expires: only the rest goes back.
    done = {first.tests[0]: Sample(1.0, False)}
    again = next_lease(q, [lease], done, 11.0)
    assert isinstance(again, Grant) and (again.batch, again.attempt) == (first.batch, 1)
    assert again.tests == ("b",) and again.predicted == 2.5
    leases = [Lease(first.batch, a, first.tests, "r", 0.0, 10.0) for a in range(3)]
    rest = [Lease(b.index, 0, b.tests, "r", 0.0, 99.0) for b in q.batches if b.index != first.batch]
    everything_else = {t: Sample(1.0, False) for b in rest for t in b.tests}
    final = next_lease(q, leases + rest, everything_else, 11.0)
    assert final == Finished(tuple(sorted(first.tests)))
    assert abandoned_tests(leases, everything_else, 11.0) == tuple(sorted(first.tests))


def test_idle_runners_wait_for_outstanding_leases_and_completions_count_once():
    q = queue_of({"a": 1.0, "b": 1.0}, 1)
    leases = [Lease(b.index, 0, b.tests, "r", 0.0, 4.0) for b in q.batches]
    wait = next_lease(q, leases, {}, 3.5)
    assert isinstance(wait, Wait) and 0.1 <= wait.seconds <= 0.5
    twice = [
        Completion("000000.001", "late", {"a": Sample(9.0, False)}),
        Completion("000000.000", "first", {"a": Sample(1.0, False), "b": Sample(2.0, True)}),
    ]
    results = completed_results(twice)
    assert results == {"a": Sample(1.0, False), "b": Sample(2.0, True)}
    assert next_lease(q, leases, results, 3.5) == Finished()
    for record in (twice[0], leases[0], q):
        assert type(record).from_bytes(record.to_bytes()) == record


def test_lease_timeouts():
    assert lease_seconds(0.0, 10.0) == 150.0
    assert lease_seconds(0.01, 10.0) == 1.0
    assert lease_seconds(5.0, 1000.0) == 5.0


@given(
    durations=st.lists(st.floats(0.01, 5.0), min_size=1, max_size=40),
    runners=st.integers(1, 5),
    deaths=st.lists(st.floats(0.0, 30.0), max_size=2),
    speeds=st.lists(st.floats(0.3, 3.0), min_size=5, max_size=5),
)
@settings(max_examples=150, deadline=None)
def test_every_test_is_leased_until_completed_and_never_after(durations, runners, deaths, speeds):
    """Runners of uneven speed, up to two of them dying mid-batch (runner 0 never dies):
    a simulation on a virtual clock driven by next_lease."""
    times = {f"tests/t{i % 5}.py::test_{i}": d for i, d in enumerate(durations)}
    q = queue_of(times, runners)
    timeout = 3.0 * max(speeds) * max(sum(times[t] for t in b.tests) for b in q.batches) + 1.0
    die_at = [float("inf")] + [float("inf")] * (runners - 1)
    for r, t in enumerate(deaths, start=1):
        if r < runners:
            die_at[r] = t
    free = [0.0] * runners
    active = set(range(runners))
    leases: list[Lease] = []
    completions: list[Completion] = []
    steps = 0
    while active:
        steps += 1
        assert steps < 10_000
        r = min(active, key=lambda k: (free[k], k))
        now = free[r]
        if now >= die_at[r]:
            active.discard(r)
            continue
        done = completed_results(completions)
        decision = next_lease(q, leases, done, now)
        if isinstance(decision, Finished):
            assert decision.abandoned == ()
            active.discard(r)
            continue
        if isinstance(decision, Wait):
            assert decision.seconds > 0
            free[r] = now + decision.seconds
            continue
        # Never a completed test, never a test another live lease holds.
        assert not set(decision.tests) & set(done)
        live = {t for lease in leases if lease.deadline > now for t in lease.tests if t not in done}
        assert not set(decision.tests) & live
        lease = Lease(decision.batch, decision.attempt, decision.tests, f"r{r}", now, now + timeout)
        leases.append(lease)
        end = now + speeds[r] * sum(times[t] for t in decision.tests)
        if end > die_at[r]:
            active.discard(r)  # dies mid-batch: nothing reported
            continue
        completions.append(
            Completion(lease.id, f"r{r}", {t: Sample(times[t], False) for t in decision.tests})
        )
        free[r] = end
    assert set(completed_results(completions)) == set(times)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab\n\ud800é", max_size=3), max_size=8))
def test_ids_digest_hashes_one_line_per_distinct_id(tests):
    # One update of all the lines (issue 23) hashes as one update per line did.
    import xxhash

    h = xxhash.xxh128()
    for t in sorted(set(tests)):
        h.update(t.encode("utf-8", "surrogatepass") + b"\n")
    assert ids_digest(tests) == h.hexdigest()
