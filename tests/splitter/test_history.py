"""Timing history: runs, merging, estimates, and the store (DiskStore)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.cache_server.storage.disk import DiskStore
from slipstream.splitter import history
from slipstream.splitter.history import Run, Sample, append_run, estimate, load_runs, merge_runs
from slipstream.splitter.ids import JUnitCase, directories_of, file_of


def run(tests, *, run_id=None, created=0, file_costs=None, startup=None):
    samples = {t: Sample(s, False) if isinstance(s, float) else s for t, s in tests.items()}
    return Run(run_id, created, samples, dict(file_costs or {}), startup)


def test_estimate_is_robust_to_one_noisy_run():
    runs = [run({"a.py::x": s}, created=i) for i, s in enumerate([1.0, 1.1, 0.9, 30.0, 1.0])]
    assert estimate(["a.py::x"], runs).tests["a.py::x"] == pytest.approx(1.0)


def test_estimate_uses_only_the_last_k_runs():
    runs = [run({"a.py::x": 10.0}, created=i) for i in range(5)]
    runs += [run({"a.py::x": 1.0}, created=10 + i) for i in range(3)]
    assert estimate(["a.py::x"], runs, last_runs=3).tests["a.py::x"] == 1.0
    assert estimate(["a.py::x"], runs, last_runs=8, percentile=90).tests["a.py::x"] == 10.0


def test_failed_samples_count_only_when_a_test_never_passed():
    runs = [
        run({"a.py::x": Sample(100.0, True), "a.py::y": Sample(7.0, True)}, created=0),
        run({"a.py::x": 2.0}, created=1),
    ]
    got = estimate(["a.py::x", "a.py::y"], runs).tests
    assert got == {"a.py::x": 2.0, "a.py::y": 7.0}


def test_unknown_tests_get_file_then_directory_then_suite_medians():
    runs = [
        run(
            {
                "d/e/test_a.py::x": 1.0,
                "d/e/test_a.py::y": 3.0,
                "d/test_b.py::z": 10.0,
                "f/test_c.py::w": 100.0,
            }
        )
    ]
    got = estimate(
        ["d/e/test_a.py::new", "d/e/test_new.py::t", "d/test_new.py::t", "g/test_n.py::t"], runs
    )
    assert got.tests["d/e/test_a.py::new"] == 2.0  # its file
    assert got.tests["d/e/test_new.py::t"] == 2.0  # its directory d/e
    assert got.tests["d/test_new.py::t"] == 3.0  # directory d: 1, 3, 10
    assert got.tests["g/test_n.py::t"] == pytest.approx(6.5)  # the suite: 1, 3, 10, 100
    assert got.known == 0 and got.from_history


def test_file_path_ids_get_the_sum_of_their_tests():
    runs = [run({"spec/a_spec.rb::x": 1.0, "spec/a_spec.rb::y": 2.0})]
    assert estimate(["spec/a_spec.rb"], runs).tests == {"spec/a_spec.rb": 3.0}


def test_no_history_means_equal_guesses():
    got = estimate(["a::x", "b::y"], [])
    assert not got.from_history
    assert got.tests == {"a::x": 1.0, "b::y": 1.0}


def test_zero_times_are_floored():
    got = estimate(["a.py::x"], [run({"a.py::x": 0.0})])
    assert got.tests["a.py::x"] == history.MIN_TEST_SECONDS


def test_shard_uploads_of_one_run_merge_into_one_run():
    parts = [
        run({"a.py::x": 1.0}, run_id="r1", created=5, file_costs={"a.py": 0.5}, startup=1.0),
        run({"b.py::y": 2.0}, run_id="r1", created=6, startup=2.0),
        run({"a.py::x": 9.0}, created=7),
    ]
    merged = merge_runs(parts)
    assert len(merged) == 2
    assert merged[0].tests == {"a.py::x": Sample(1.0, False), "b.py::y": Sample(2.0, False)}
    assert merged[0].file_costs == {"a.py": 0.5} and merged[0].startup == 2.0


def test_run_from_cases_skips_skips_and_counts_reruns_once():
    def case(name, time, outcome="passed"):
        return JUnitCase("tests.test_a", name, None, time, outcome, "r.xml")

    cases = [
        case("test_r", 5.0, "failed"),
        case("test_r", 1.0),
        case("test_s", 0.0, "skipped"),
        case("test_n", None),
    ]
    got = history.run_from_cases(cases, created_ns=1)
    assert got.tests == {"tests/test_a.py::test_r": Sample(1.0, False)}
    by_file = history.run_from_cases(cases, created_ns=1, candidates=["tests/test_a.py"])
    assert by_file.tests == {"tests/test_a.py": Sample(1.0, False)}


def test_records_round_trip():
    original = run({"a.py::x": Sample(1.5, True)}, run_id="r", created=3, file_costs={"a.py": 2.0})
    original.startup = 0.25
    assert history.decode_run(history.encode_run(original)) == original
    with pytest.raises(ValueError):
        history.decode_run(b'{"version": 1}')
    with pytest.raises(ValueError):
        history.decode_run(b"not json")


@pytest.fixture
def store(tmp_path):
    s = DiskStore(tmp_path / "store")
    yield s
    s.close()


def test_concurrent_appends_never_overwrite(store):
    def upload(i):
        append_run(store, "suite", run({f"t{i}.py::x": float(i)}, run_id="r", created=1))

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runs, warnings = load_runs(store, "suite")
    assert warnings == [] and len(runs) == 16
    merged = merge_runs(runs)
    assert len(merged) == 1 and len(merged[0].tests) == 16


def test_suites_are_separate_and_bad_records_are_warned_about(store):
    append_run(store, "one", run({"a.py::x": 1.0}, created=1))
    append_run(store, "one-more", run({"b.py::x": 1.0}, created=1))
    store.put_record(history.NAMESPACE, "one/00000000000000000002-bad", b"garbage")
    runs, warnings = load_runs(store, "one")
    assert [list(r.tests) for r in runs] == [["a.py::x"]]
    assert len(warnings) == 1 and "one/00000000000000000002-bad" in warnings[0]


@pytest.mark.parametrize("suite", ["", "a/b", "x" * 65, "../up"])
def test_bad_suite_names(store, suite):
    with pytest.raises(history.HistoryError):
        load_runs(store, suite)


def _plain_merge_runs(runs: list[Run]) -> list[Run]:
    merged: dict[str, Run] = {}
    alone: list[Run] = []
    for r in sorted(runs, key=lambda r: r.created_ns):
        if r.run_id is None:
            alone.append(r)
            continue
        into = merged.setdefault(r.run_id, Run(r.run_id, r.created_ns))
        for test, sample in r.tests.items():
            into.tests[test] = history._merge_sample(into.tests.get(test), sample)
        into.file_costs.update(r.file_costs)
        if r.startup is not None:
            into.startup = max(into.startup or 0.0, r.startup)
        into.groups.update(r.groups)
    return sorted([*merged.values(), *alone], key=lambda r: (r.created_ns, r.run_id or ""))


_samples = st.dictionaries(
    st.sampled_from(["a.py::x", "a.py::y", "b/c.py::z"]),
    st.builds(Sample, st.sampled_from([0.0, 1.0, 2.0]), st.booleans()),
    max_size=3,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.builds(
            lambda run_id, created, tests: Run(run_id, created, tests),
            st.sampled_from([None, "r1", "r2"]),
            st.integers(0, 3),
            _samples,
        ),
        max_size=5,
    )
)
def test_merge_runs_is_the_plain_fold_of_samples(runs):
    # A run's first upload is taken whole (issue 23): the same as merging it sample by sample.
    got, expected = merge_runs(runs), _plain_merge_runs(runs)
    assert [(r.run_id, r.created_ns, r.tests) for r in got] == [
        (r.run_id, r.created_ns, r.tests) for r in expected
    ]
    assert [list(r.tests) for r in got] == [list(r.tests) for r in expected]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["a.py::x", "a.py::y", "b/c.py::z"]),
        st.floats() | st.sampled_from([0.0, -0.0, 1e-9, history.MIN_TEST_SECONDS]),
        min_size=1,
    ),
    st.booleans(),
)
def test_a_test_timed_once_gets_its_time_floored(seconds, alone):
    # With one run or one sample of a test, the percentile of its one time is inlined
    # (issue 23): the same as _percentile's, floored at MIN_TEST_SECONDS (nan, inf too).
    runs = [run({t: Sample(s, False) for t, s in seconds.items()})]
    if not alone:
        runs.append(run({"other.py::t": 1.0}, created=1))
    got = estimate(seconds, runs)
    for t, s in seconds.items():
        assert got.tests[t] == max(history.MIN_TEST_SECONDS, history._percentile([s], 50.0))


def _plain_estimate(tests: list[str], runs: list[Run], last_runs: int = 10) -> history.Estimates:
    """estimate as it was before the Estimator kept the runs' part (issue 23)."""
    wanted = sorted(set(tests))
    merged = merge_runs(runs)
    samples: dict[str, list[Sample]] = {}
    for r in reversed(merged):
        for test, sample in r.tests.items():
            got = samples.setdefault(test, [])
            if len(got) < last_runs:
                got.append(sample)
    own = {}
    for test, got in samples.items():
        passed = [s.seconds for s in got if not s.failed]
        own[test] = max(
            history.MIN_TEST_SECONDS, history._percentile(passed or [s.seconds for s in got], 50)
        )
    file_samples: dict[str, list[float]] = {}
    for r in reversed(merged):
        for f, cost in r.file_costs.items():
            got_f = file_samples.setdefault(f, [])
            if len(got_f) < last_runs:
                got_f.append(cost)
    file_costs = {f: history._percentile(v, 50) for f, v in file_samples.items()}
    startups = [r.startup for r in merged[-last_runs:] if r.startup is not None]
    startup = history._median(startups) if startups else 0.0
    if not own:
        return history.Estimates({t: 1.0 for t in wanted}, file_costs, False, 0, startup)
    by_file: dict[str, list[float]] = {}
    file_total: dict[str, float] = {}
    for test, seconds in own.items():
        f = file_of(test)
        if f != test:
            file_total[f] = file_total.get(f, 0.0) + seconds
        by_file.setdefault(f, []).append(seconds)
    by_directory: dict[str, list[float]] = {}
    for path, values in by_file.items():
        for d in directories_of(path):
            by_directory.setdefault(d, []).extend(values)
    result = {}
    guessed = 0
    for test in wanted:
        if test in own:
            result[test] = own[test]
        elif test in file_total:
            result[test] = file_total[test]
        else:
            f = file_of(test)
            scope = next(s for s in [f, *directories_of(f)] if s in by_file or s in by_directory)
            result[test] = history._median(by_file.get(scope, []) + by_directory.get(scope, []))
            guessed += 1
    if file_costs:
        fallback = history._median(list(file_costs.values()))
        for f in {file_of(t) for t in wanted} - file_costs.keys():
            file_costs[f] = fallback
    return history.Estimates(result, file_costs, True, len(result) - guessed, startup)


_TEST_IDS = st.sampled_from(
    ["a.py::x", "a.py::y", "a.py::T::z", "b/c.py::z", "b/d.py::w", "b/c.py", "e/f.py::v[1]"]
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.builds(
            lambda run_id, created, tests, costs, startup: Run(
                run_id, created, tests, costs, startup
            ),
            st.sampled_from([None, "r1", "r2"]),
            st.integers(0, 3),
            st.dictionaries(
                _TEST_IDS,
                st.builds(Sample, st.sampled_from([0.0, 0.25, 1.0, 2.5]), st.booleans()),
                max_size=5,
            ),
            st.dictionaries(st.sampled_from(["a.py", "b/c.py"]), st.sampled_from([0.5, 3.0])),
            st.sampled_from([None, 1.0, 4.0]),
        ),
        max_size=5,
    ),
    st.lists(
        st.lists(_TEST_IDS | st.sampled_from(["g/h.py::u", "b/new.py::n", "a.py", "b"]), max_size=8)
    ),
)
def test_a_kept_estimator_estimates_as_the_plain_estimate(runs, test_sets):
    # The split server keeps an Estimator per history version and asks it for the
    # tests of every plan: each answer is the one a fresh estimate gives.
    estimator = history.Estimator(runs)
    for tests in test_sets:
        got, expected = estimator.estimate(tests), _plain_estimate(tests, runs)
        assert got == expected
        assert list(got.tests) == list(expected.tests)
        assert history.estimate(tests, runs) == expected
    assert estimator.groups == history.groups_of(runs)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "a.py::x", "a.py::y", "B", ""]), max_size=8), st.booleans()
)
def test_sorted_distinct_is_sorted_set(tests, presorted):
    # Without a set of 100,000 ids when they are distinct, or sorted already (issue 23).
    if presorted:
        tests = sorted(set(tests))
    got = history.sorted_distinct(iter(tests) if presorted else tests)
    assert got == sorted(set(tests))
    # and given again, taken as it is
    assert history.sorted_distinct(got) is got


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        _TEST_IDS | st.sampled_from(["a.py", "a[1].py::v", "a[1].py", "a.py2::q", "b"]),
        st.sampled_from([0.5, 1.0, 2.0]),
    )
)
def test_values_by_file_are_each_files_tests_values_in_order(own):
    # Cut where the file changes, in C (issue 23); a file's tests apart (unsorted, or a
    # "[" in a path) are put together as one by one.
    expected: dict[str, list[float]] = {}
    for test, seconds in own.items():
        expected.setdefault(file_of(test), []).append(seconds)
    assert history._values_by_file(own) == expected
