"""Test ids and the mapping of JUnit cases onto them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.splitter.ids import (
    JUnitCase,
    case_file,
    class_of,
    directories_of,
    file_map,
    file_of,
    files_of,
    junit_key,
    match_cases,
    node_id,
    node_ids,
    normalize_path,
)


def case(classname, name, file=None, time=1.0, outcome="passed"):
    return JUnitCase(classname, name, file, time, outcome, "r.xml")


@pytest.mark.parametrize(
    ("test_id", "file", "cls"),
    [
        ("tests/test_x.py::test_a", "tests/test_x.py", None),
        ("tests/test_x.py::TestC::test_a[1]", "tests/test_x.py", "tests/test_x.py::TestC"),
        (
            "tests/test_x.py::TestC::Inner::test_a",
            "tests/test_x.py",
            "tests/test_x.py::TestC::Inner",
        ),
        ("tests/test_x.py::test_a[a::b::c]", "tests/test_x.py", None),
        ("spec/models/user_spec.rb", "spec/models/user_spec.rb", None),
    ],
)
def test_file_and_class_of(test_id, file, cls):
    assert file_of(test_id) == file
    assert class_of(test_id) == cls


def test_directories_of():
    assert directories_of("a/b/c.py") == ["a/b", "a", ""]
    assert directories_of("c.py") == [""]


def test_junit_key_is_what_pytest_writes():
    assert junit_key("tests/sub/test_x.py::TestC::test_y[p]") == (
        "tests.sub.test_x.TestC",
        "test_y[p]",
    )
    assert junit_key("com.acme.UserTest") is None


_segment = st.text(alphabet="abcdefgh_", min_size=1, max_size=5)


@given(
    st.lists(_segment, min_size=0, max_size=3),
    _segment,
    st.lists(st.builds(lambda s: "Test" + s, _segment), max_size=2),
    st.text(min_size=1, max_size=8).filter(lambda s: "::" not in s and "[" not in s),
    st.booleans(),
)
def test_node_id_round_trips_through_pytest_junit(dirs, module, classes, name, with_file):
    path = "/".join([*dirs, f"test_{module}.py"])
    nodeid = "::".join([path, *classes, name])
    classname, junit_name = junit_key(nodeid)  # type: ignore[misc]
    assert node_id(case(classname, junit_name, path if with_file else None)) == nodeid


def test_match_cases_by_node_id_file_and_class():
    cases = [
        case("tests.test_child.TestChild", "test_base", file="tests/base.py"),
        case("tests.test_a", "test_x", time=2.0),
        case("spec.user_spec", "User works", file="./spec/user_spec.rb", time=3.0),
        case("com.acme.UserTest", "testA", time=4.0),
        case("com.acme.UserTest", "testB", time=5.0),
    ]
    matched = match_cases(
        cases,
        [
            "tests/test_child.py::TestChild::test_base",
            "tests/test_a.py::test_x",
            "spec/user_spec.rb",
            "com.acme.UserTest",
            "tests/test_new.py::test_unknown",
        ],
    )
    assert [c.name for c in matched["tests/test_child.py::TestChild::test_base"]] == ["test_base"]
    assert [c.time for c in matched["tests/test_a.py::test_x"]] == [2.0]
    assert [c.time for c in matched["spec/user_spec.rb"]] == [3.0]
    assert sorted(c.name for c in matched["com.acme.UserTest"]) == ["testA", "testB"]
    assert "tests/test_new.py::test_unknown" not in matched


# The look-ups of match_cases, file_of and class_of were made fast for 100,000 tests
# (issue 23); these are the plain definitions they must agree with.
_PIECE = st.text(alphabet="ab.A:/[]_-Tt", max_size=8)
_ID = st.lists(
    st.sampled_from(["tests/test_a.py", "t/b_test.py", "x", "::", ":::", ":", "[", "]", "TestK"])
    | _PIECE,
    max_size=6,
).map("".join)


def _plain_parts(test_id: str) -> list[str]:
    base, bracket, params = test_id.partition("[")
    parts = base.split("::")
    parts[-1] += bracket + params
    return parts


def _plain_match_cases(cases: list[JUnitCase], candidates: list[str]) -> dict[str, list[JUnitCase]]:
    by_key: dict[tuple[str, str], list[JUnitCase]] = {}
    by_id: dict[str, list[JUnitCase]] = {}
    by_file: dict[str, list[JUnitCase]] = {}
    by_class: dict[str, list[JUnitCase]] = {}
    for case in cases:
        by_key.setdefault((case.classname, case.name), []).append(case)
        by_id.setdefault(node_id(case), []).append(case)
        by_file.setdefault(case_file(case), []).append(case)
        by_class.setdefault(case.classname, []).append(case)
    out: dict[str, list[JUnitCase]] = {}
    for candidate in candidates:
        key = junit_key(candidate)
        found = (
            (by_key.get(key) if key else None)
            or by_id.get(candidate)
            or by_file.get(normalize_path(candidate))
            or by_class.get(candidate)
        )
        if found:
            out[candidate] = found
    return out


@settings(max_examples=500)
@given(_ID)
def test_file_and_class_of_are_those_of_the_parts(test_id: str) -> None:
    parts = _plain_parts(test_id)
    assert file_of(test_id) == parts[0]
    assert class_of(test_id) == ("::".join(parts[:-1]) if len(parts) > 2 else None)


_CASES = st.lists(
    st.builds(
        JUnitCase,
        classname=st.sampled_from(["", "tests.test_a", "tests.test_a.TestK", "t.b_test", "Foo"])
        | _PIECE,
        name=st.sampled_from(["test_x", "test_y[a::b]", "t[p]"]) | _PIECE,
        file=st.sampled_from([None, "", "tests/test_a.py", "./t/b_test.py", "x\\y.rb"]),
        time=st.just(1.0),
        outcome=st.just("passed"),
        source=st.just("r.xml"),
    ),
    max_size=8,
)


@given(_CASES, st.lists(_ID | st.sampled_from(["tests/test_a.py::test_x", "Foo"]), max_size=8))
def test_match_cases_agrees_with_its_plain_definition(
    cases: list[JUnitCase], candidates: list[str]
) -> None:
    candidates += [node_id(c) for c in cases] + [case_file(c) for c in cases]
    got = match_cases(cases, candidates)
    # In the same order too: a run's timings are added up in it.
    assert list(got.items()) == list(_plain_match_cases(cases, candidates).items())
    assert node_ids(cases) == [node_id(c) for c in cases]


@settings(max_examples=500)
@given(st.lists(_ID, max_size=10))
def test_file_map_and_files_of_are_file_of_each(test_ids: list[str]) -> None:
    assert file_map(test_ids) == {t: file_of(t) for t in test_ids}
    assert files_of(test_ids) == [file_of(t) for t in test_ids]
