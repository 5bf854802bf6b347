"""Reading JUnit reports: the dialects corpus in data/, bad files, XML bombs."""

from __future__ import annotations

import pathlib

import pytest

from slipstream.splitter.ids import node_id
from slipstream.splitter.junit import NotJUnit, expand_paths, parse_report, parse_time, read_reports

DATA = pathlib.Path(__file__).parent / "data"


def cases_of(name: str):
    reports, warnings = read_reports([DATA / name])
    assert warnings == []
    return {node_id(c): c for c in reports[0].cases}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.5", 1.5),
        (" 2 ", 2.0),
        ("1,078", 1078.0),
        ("2,120.532", 2120.532),
        ("1,234,567", 1234567.0),
        ("0,5", 0.5),
        ("12,25", 12.25),
        ("0,125", 0.125),
        ("1e-3", 0.001),
        ("", None),
        ("abc", None),
        ("-1", None),
        ("nan", None),
        ("inf", None),
        (None, None),
    ],
)
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


def test_pytest_xunit2_ids_are_rebuilt_from_classname():
    cases = cases_of("pytest_xunit2.xml")
    assert cases["tests/test_x.py::TestC::test_y[a-b]"].time == 1.5
    assert cases["tests/test_x.py::test_plain"].time == 0.0
    assert cases["tests/sub/test_z.py::test_fails"].outcome == "failed"
    assert cases["tests/sub/test_z.py::test_skip"].outcome == "skipped"


def test_pytest_xunit1_file_attribute_and_inherited_tests():
    cases = cases_of("pytest_xunit1.xml")
    assert cases["tests/test_x.py::TestC::test_y[a-b]"].time == 1.5
    # file="tests/base.py" names where the method is defined; the classname names the
    # module that collected it, which is what the node id uses.
    assert "tests/test_child.py::TestChild::test_base_method" in cases
    assert cases["tests/test_x.py::test_err"].outcome == "failed"  # error means failed


def test_bare_testsuite_root_and_go_names():
    cases = cases_of("bare_testsuite.xml")
    assert set(cases) == {"github.com/acme/pkg::TestAlpha", "github.com/acme/pkg::TestBeta"}


def test_rspec_file_attribute_with_dot_slash():
    reports, _ = read_reports([DATA / "rspec.xml"])
    assert {c.file for c in reports[0].cases} == {
        "spec/models/user_spec.rb",
        "spec/api/orders_spec.rb",
    }


def test_jest_file_attribute_on_testcase():
    reports, _ = read_reports([DATA / "jest.xml"])
    assert [(c.file, c.time) for c in reports[0].cases] == [
        ("src/math.test.js", 0.5),
        ("src/math.test.js", 1.0),
    ]


def test_mocha_file_on_suite_reaches_nested_suites():
    reports, _ = read_reports([DATA / "mocha_nested.xml"])
    cases = reports[0].cases
    assert len(cases) == 3
    assert {c.file for c in cases} == {"test/cart.spec.js"}


def test_surefire_separators_reruns_and_skips():
    reports, _ = read_reports([DATA / "surefire.xml"])
    by_name = {c.name: c for c in reports[0].cases}
    assert by_name["testSlow"].time == 1078.0
    assert by_name["testFlaky"].outcome == "passed"  # flakyFailure: passed on a rerun
    assert by_name["testBroken"].outcome == "failed"
    assert by_name["testSkipped"].outcome == "skipped"
    assert by_name["testNoTime"].time is None
    assert len(reports[0].cases) == 5  # reruns are not extra cases


def test_gradle_decimal_commas():
    reports, _ = read_reports([DATA / "gradle.xml"])
    assert [c.time for c in reports[0].cases] == [0.25, 0.25]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("empty.xml", "is empty"),
        ("not_xml.xml", "is not well-formed XML"),
        ("truncated.xml", "is not well-formed XML"),
        ("not_junit.xml", "not a JUnit report (root element <html>)"),
        ("xml_bomb.xml", "declares XML entities"),
        ("xxe.xml", "declares XML entities"),
    ],
)
def test_bad_files_get_one_warning_line_and_the_rest_are_used(name, problem):
    reports, warnings = read_reports([DATA / name, DATA / "pytest_xunit2.xml"])
    assert len(warnings) == 1
    assert "\n" not in warnings[0]
    assert warnings[0].startswith(str(DATA / name) + ": ")
    assert problem in warnings[0]
    assert [r.path for r in reports] == [str(DATA / "pytest_xunit2.xml")]


def test_missing_file_is_a_warning_too(tmp_path):
    _, warnings = read_reports([tmp_path / "gone.xml"])
    assert len(warnings) == 1 and "gone.xml" in warnings[0]


def test_entities_are_refused_at_their_declaration():
    # The bomb's entities are refused where they are declared, before any reference.
    with pytest.raises(NotJUnit, match="declares XML entities"):
        parse_report([b'<!DOCTYPE t [<!ENTITY a "x">]><testsuite/>'], "decl-only")
    with pytest.raises(NotJUnit, match="declares XML entities"):
        parse_report([(DATA / "xml_bomb.xml").read_bytes()], "bomb")


def test_huge_system_out_is_streamed_not_kept():
    head = b'<testsuite><testcase classname="tests.test_a" name="test_x" time="1"><system-out>'
    tail = b"</system-out></testcase></testsuite>"
    chunks = [head, *([b"x" * (1 << 20)] * 64), tail]  # 64 MiB of output
    report = parse_report(iter(chunks), "huge")
    assert [(c.name, c.time) for c in report.cases] == [("test_x", 1.0)]


def test_duplicate_testcases_are_all_read():
    reports, _ = read_reports([DATA / "duplicates.xml"])
    assert len(reports[0].cases) == 3  # counted once later, by history.run_from_cases


def test_expand_paths_globs_and_missing(tmp_path):
    (tmp_path / "a").mkdir()
    for rel in ("a/x.xml", "a/y.xml", "b.xml"):
        (tmp_path / rel).write_text("<testsuite/>")
    found = expand_paths([str(tmp_path / "**" / "*.xml"), str(tmp_path / "b.xml")])
    assert [p.name for p in found] == ["x.xml", "y.xml", "b.xml"]  # sorted, no duplicates
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_paths([str(tmp_path / "*.json")])
    with pytest.raises(FileNotFoundError, match="no such file"):
        expand_paths([str(tmp_path / "none.xml")])
