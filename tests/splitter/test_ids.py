"""Test ids and the mapping of JUnit cases onto them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slipstream.splitter.ids import (
    JUnitCase,
    class_of,
    directories_of,
    file_of,
    junit_key,
    match_cases,
    node_id,
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
