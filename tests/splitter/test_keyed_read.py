"""A report read straight onto the test ids (``sources.run_of_report``, issue 23) gives
the run the plain read and match give (``junit.read_reports`` then
``history.run_from_cases``), or hands over to them."""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.split_scale_suite import write_inputs
from slipstream.splitter import history, junit
from slipstream.splitter.history import Run
from slipstream.splitter.ids import node_id, slots_by_key
from slipstream.splitter.sources import (
    estimator_from_junit,
    estimator_of_report,
    run_of_report,
    runs_from_junit,
)

DATA = pathlib.Path(__file__).parent / "data"
T = TypeVar("T")


def plain_runs(paths: list[pathlib.Path], candidates: list[str]) -> tuple[list[Run], list[str]]:
    """What runs_from_junit gave before it read reports straight onto the ids."""
    reports, warnings = junit.read_reports(paths)
    runs = [
        history.run_from_cases(
            r.cases,
            created_ns=n,
            file_costs=r.file_costs,
            candidates=candidates,
            startup=r.startup,
        )
        for n, r in enumerate(reports)
    ]
    return runs, warnings


def as_compared(run: Run) -> tuple[object, ...]:
    """A run's fields, its dicts in their order (a run's timings are added up in it)."""
    return (
        run.run_id,
        run.created_ns,
        list(run.tests.items()),
        list(run.file_costs.items()),
        run.startup,
        list(run.groups.items()),
    )


@dataclass
class Case:
    classname: str | None
    name: str | None
    file: str | None
    time: str | None
    children: list[str]
    group: str | None


@dataclass
class Suite:
    file: str | None
    props: list[tuple[str, str]]
    items: list[Case | Suite] = field(default_factory=list)


def _attrs(**values: str | None) -> str:
    return "".join(f" {k}={quoteattr(v)}" for k, v in values.items() if v is not None)


def _case_xml(case: Case) -> str:
    head = "<testcase" + _attrs(
        classname=case.classname, name=case.name, file=case.file, time=case.time
    )
    body = "".join(f"<{tag}/>" for tag in case.children)
    if case.group is not None:
        body += (
            f'<properties><property name="xdist_group" value={quoteattr(case.group)}/></properties>'
        )
    return f"{head}>{body}</testcase>" if body else head + "/>"


def _suite_xml(suite: Suite) -> str:
    props = "".join(f"<property name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in suite.props)
    inner = "".join(
        _case_xml(item) if isinstance(item, Case) else _suite_xml(item) for item in suite.items
    )
    props_xml = f"<properties>{props}</properties>" if props else ""
    return f"<testsuite{_attrs(file=suite.file)}>{props_xml}{inner}</testsuite>"


# Mostly what pytest writes (the fast path's ground), some of everything else.
_PYTEST_CLASSNAMES = [
    "tests.test_a",
    "tests.test_a.TestK",
    "tests.test_a.TestK.Inner",
    "tests.sub.test_b",
    "tests.sub.test_b.TestB",
]
_OTHER_CLASSNAMES = [
    "test_c",
    "t.b_test",
    "tests.test_a.lower",
    "com.acme.UserTest",
    "github.com/acme/pkg",
    "",
    "tests.test_a.TestK:x",
    "tests.test_a.Test[K]",
]
_PYTEST_NAMES = ["test_x", "test_y", "test_y[a::b/0-x.y]", "test_w[p-1]", "test_v[]"]
_OTHER_NAMES = ["test_z[p:1]", "t:x", "x::y", "testA", ""]
_PYTEST_FILES = [None, "tests/test_a.py", "tests/sub/test_b.py", "tests/base.py"]
_OTHER_FILES = ["", "./tests/test_a.py", "tests\\test_a.py", "spec/user_spec.rb", "t.py::u.py"]
_PYTEST_TIMES = ["0.000", "0.0004", "0.001", "0.002", "1.5", "0.5", "2.25"]
_OTHER_TIMES = [None, "1,078", "0,5", "abc", "-1", ""]
_PYTEST_CHILDREN = [[], [], [], ["failure"], ["skipped"], ["error", "system-out"]]
_OTHER_CHILDREN = [["flakyFailure"], ["rerunFailure"], ["skipped", "failure"], ["system-out"]]


def _mostly(common: Sequence[T], other: Sequence[T], odd: bool) -> st.SearchStrategy[T]:
    """One of common, or (when odd) one of other now and then."""
    return st.sampled_from([*common, *common, *common, *other]) if odd else st.sampled_from(common)


def _cases(odd: bool) -> st.SearchStrategy[Case]:
    return st.builds(
        Case,
        classname=_mostly(_PYTEST_CLASSNAMES, [*_OTHER_CLASSNAMES, None], odd),
        name=_mostly(_PYTEST_NAMES, [*_OTHER_NAMES, None], odd),
        file=_mostly(_PYTEST_FILES, _OTHER_FILES, odd),
        time=_mostly(_PYTEST_TIMES, _OTHER_TIMES, odd),
        children=_mostly(_PYTEST_CHILDREN, _OTHER_CHILDREN, odd),
        group=st.sampled_from([None] * 6 + ["g1", "g2", ""]),
    )


_PROPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "slipstream.startup",
                "slipstream.file_cost:tests/test_a.py",
                "slipstream.file_cost:tests/sub/test_b.py",
                "other",
            ]
        ),
        st.sampled_from(["1.5", "0.25", "x"]),
    ),
    max_size=2,
)


def _suites(cases: st.SearchStrategy[Case], odd: bool) -> st.SearchStrategy[Suite]:
    files = _mostly(_PYTEST_FILES, _OTHER_FILES, odd)
    return st.recursive(
        st.builds(Suite, files, _PROPS, st.lists(cases, max_size=6)),
        lambda inner: st.builds(Suite, files, _PROPS, st.lists(cases | inner, max_size=4)),
        max_leaves=8,
    )


@st.composite
def reports(draw: st.DrawFn, odd: bool) -> tuple[str, list[Case]]:
    """A JUnit report: a <testsuites> of suites and cases, or one <testsuite>; cases
    are drawn from a few, so the same one comes twice (a rerun) now and then. With
    the report, its cases."""
    cases = _cases(odd)
    pool = draw(st.lists(cases, min_size=1, max_size=5))
    reuse = st.sampled_from(pool)
    some_cases = cases | reuse
    suite = draw(_suites(some_cases, odd))
    if draw(st.booleans()):
        return _suite_xml(suite), _cases_in(suite)
    root_cases = draw(st.lists(some_cases, max_size=2)) if odd else []
    more = draw(st.lists(_suites(some_cases, odd), max_size=1))
    xml = (
        "<testsuites>"
        + "".join(_case_xml(c) for c in root_cases[:1])
        + _suite_xml(suite)
        + "".join(_suite_xml(s) for s in more)
        + "".join(_case_xml(c) for c in root_cases[1:])
        + "</testsuites>"
    )
    return xml, root_cases + _cases_in(suite) + [c for s in more for c in _cases_in(s)]


def _cases_in(suite: Suite) -> list[Case]:
    return [c for i in suite.items for c in ([i] if isinstance(i, Case) else _cases_in(i))]


_IDS = st.sampled_from(
    [
        "tests/test_a.py::test_x",
        "tests/test_a.py::TestK::test_y",
        "tests/test_a.py::TestK::test_y[a::b/0-x.y]",
        "tests/test_a.py::TestK::Inner::test_x",
        "tests/test_a.py::lower::test_x",
        "tests/sub/test_b.py::test_z[p:1]",
        "tests/test_new.py::test_x",
        "tests/test_a.py::test_new",
        "test_c.py::test_x",
        "tests/test_a.py:::test_x",
        "tests/test_a.py::TestK:x::test_x",
        "com.acme.UserTest::testA",
        "github.com/acme/pkg::testA",
        "tests/test_a.py",
        "tests/test_a.py::x",
        "tests/test_a.py::x::y",
        "t.py::u.py",
        "com.acme.UserTest",
        "spec/user_spec.rb",
        "tests.test_a.TestK",
    ]
)


def _check(path: pathlib.Path, candidates: list[str]) -> Run | None:
    """runs_from_junit gives the plain runs and warnings; so does run_of_report alone,
    where it does not hand over (None). Returns its run."""
    expected_runs, expected_warnings = plain_runs([path], candidates)
    runs, warnings = runs_from_junit([str(path)], candidates)
    assert warnings == expected_warnings
    assert [as_compared(r) for r in runs] == [as_compared(r) for r in expected_runs]
    slots = slots_by_key(candidates)
    fast = None if slots is None else run_of_report(path, candidates, slots, created_ns=0)
    if fast is not None:
        assert as_compared(fast) == as_compared(expected_runs[0])
    # and the estimator made straight from the report is the plain runs' one
    estimator, warnings = estimator_from_junit(
        [str(path)], candidates, last_runs=history.DEFAULT_LAST_RUNS, percentile=50.0
    )
    assert warnings == expected_warnings
    expected = history.Estimator(expected_runs, percentile=50.0)
    assert as_estimated(estimator) == as_estimated(expected)
    assert as_estimates(estimator.estimate(candidates)) == as_estimates(
        history.estimate(candidates, expected_runs)
    )
    if slots is not None and fast is not None:  # made straight from the report
        made = estimator_of_report(path, candidates, slots, percentile=50.0)
        assert made is not None and as_estimated(made) == as_estimated(expected)
    return fast


def as_estimated(estimator: history.Estimator) -> tuple[object, ...]:
    return (
        list(estimator.own.items()),
        list(estimator.file_costs.items()),
        estimator.startup,
        list(estimator.groups.items()),
    )


def as_estimates(estimates: history.Estimates) -> tuple[object, ...]:
    return (
        list(estimates.tests.items()),
        list(estimates.file_costs.items()),
        estimates.from_history,
        estimates.known,
        estimates.startup,
    )


# Cases a missed id names otherwise than by (classname, name), added after the others:
# by its node id (a name with "::"), by its file (a classname's second file)
_NAMED_OTHERWISE = [
    (Case("tests.test_a", "x::y", None, "1.5", [], None), "tests/test_a.py::x::y"),
    (Case("tests.test_a", "test_q", "t.py::u.py", "2.5", [], None), "t.py::u.py"),
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(reports(odd=False), st.data())
def test_a_pytest_report_read_onto_its_ids_is_the_plain_read_and_match(
    report: tuple[str, list[Case]], data: st.DataObject
) -> None:
    """What pytest writes: xunit1 and xunit2, classes, parameters with "::", reruns,
    failures, xfails and skips with and without time, groups, nested suites; the ids
    those of some of its cases (sorted, each once, as the CLI gives them) and new ones;
    now and then a case a missed id names otherwise (then the plain match does it)."""
    xml, _ = report
    named_otherwise = data.draw(st.lists(st.sampled_from(_NAMED_OTHERWISE), max_size=2))
    added = "".join(_case_xml(c) for c, _ in named_otherwise)
    xml = xml.replace("</testsuite></testsuites>", added + "</testsuite></testsuites>")
    if added and xml.endswith("</testsuite>"):
        xml = xml[: -len("</testsuite>")] + added + "</testsuite>"
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "r.xml"
        path.write_text(xml)
        ids = {node_id(c) for c in junit.read_reports([path])[0][0].cases}
        ids -= {node_id_ for _, node_id_ in _NAMED_OTHERWISE}
        kept = data.draw(st.sets(st.sampled_from(sorted(ids)))) if ids else set()
        new = data.draw(st.sets(st.sampled_from(["tests/test_a.py::test_new", "tests/new.py::t"])))
        otherwise = {node_id_ for _, node_id_ in named_otherwise}
        candidates = sorted(kept | new | otherwise)
        fast = _check(path, candidates)
        if not otherwise:
            assert fast is not None  # all ids keyed, each once, no case named otherwise


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(reports(odd=True), st.lists(_IDS, max_size=8), st.booleans(), st.booleans())
def test_any_report_read_onto_any_ids_is_the_plain_read_and_match(
    report: tuple[str, list[Case]], extra: list[str], with_node_ids: bool, sort: bool
) -> None:
    """Every dialect and oddity: names and classnames with ":" and "[", files named
    otherwise, missing names and times, decimal commas, root-level cases, ids that are
    files or classes, ids twice, unsorted."""
    xml, _ = report
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "r.xml"
        path.write_text(xml)
        reports_read, _ = junit.read_reports([path])
        cases = reports_read[0].cases if reports_read else ()
        candidates = extra + ([node_id(c) for c in cases] if with_node_ids else [])
        if sort:
            candidates = sorted(set(candidates))
        _check(path, candidates)


def test_a_pytest_report_is_read_onto_the_ids(tmp_path: pathlib.Path) -> None:
    """The benchmark's suite (reruns, xfails, skips, parameters with "::", new and
    deleted tests) and pytest's own reports take the fast path, with the plain result."""
    ids_path, run1, run2 = write_inputs(tmp_path, 3000)
    ids = sorted(set(ids_path.read_text().split()))
    for path in (run1, run2, DATA / "pytest_xunit1.xml", DATA / "pytest_xunit2.xml"):
        cases = junit.read_reports([path])[0][0].cases
        # (pytest_xunit2's collection error has no "::" in its id: the plain match's)
        node_ids = sorted({node_id(c) for c in cases} - {"tests.test_broken"})
        candidates = ids if path in (run1, run2) else node_ids
        candidates = [*candidates, "tests/test_gone.py::test_new"]
        slots = slots_by_key(candidates)
        assert slots is not None
        fast = run_of_report(path, candidates, slots, created_ns=0)
        assert fast is not None, path
        assert as_compared(fast) == as_compared(plain_runs([path], candidates)[0][0])
    assert fast is not None and fast.tests


@pytest.mark.parametrize(
    "name",
    ["not_xml.xml", "truncated.xml", "xml_bomb.xml", "xxe.xml", "empty.xml", "not_junit.xml"],
)
def test_a_bad_report_is_warned_about_as_before(name: str) -> None:
    candidates = ["tests/test_a.py::test_x"]
    runs, warnings = runs_from_junit([str(DATA / name)], candidates)
    assert (runs, warnings) == plain_runs([DATA / name], candidates)
    assert len(warnings) == 1 and warnings[0].endswith("; ignored")


def test_ids_a_case_names_otherwise_hand_over_to_the_plain_match(tmp_path: pathlib.Path) -> None:
    """A missed id that is a case's file (by_file) cannot be told from the scopes: the
    plain match does it. Likewise ids without a (classname, name) key."""
    path = tmp_path / "r.xml"
    path.write_text(
        '<testsuite><testcase classname="z" name="q" file="t.py::u.py" time="1.5"/></testsuite>'
    )
    candidates = ["t.py::u.py", "x.py::t"]  # the first: key ("t", "u.py"), and the file
    slots = slots_by_key(candidates)
    assert slots is not None
    assert run_of_report(path, candidates, slots, created_ns=0) is None
    runs, _ = runs_from_junit([str(path)], candidates)
    assert runs[0].tests == {"t.py::u.py": history.Sample(1.5, False)}
    assert slots_by_key(["tests/test_a.py"]) is None  # a file: no key
    assert slots_by_key(["a/b.py::t", "a.b.py::t"]) is None  # one key for two ids
