"""A generated pytest suite at scale: its node ids and JUnit reports of its timings.

Deterministic from (tests, seed): the same ids and the same bytes every time, so plans
made from them can be compared across versions of the splitter (tests/splitter/
test_plan_hash.py holds the recorded plan hashes). At 100,000 tests the plain report is
about 11 MB, like the suite of issue 23.

The shape: files of 10-70 tests in 3 levels of packages, half the tests in classes,
parametrized ids (some with ``::`` and ``/`` in their parameters), heavy-tailed times;
reports in pytest's xunit1 form (``file`` and ``line``), with failures, reruns (a test
written twice), xfails and up-front skips, some ``system-out``, and 5% of the ids new
since the report (no timing of their own) while 2% of the report's cases are gone.
"""

from __future__ import annotations

import pathlib
import random
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr


@dataclass(frozen=True)
class Case:
    test_id: str
    classname: str
    name: str
    file: str
    line: int


@dataclass(frozen=True)
class Suite:
    """The ids a runner collects (in collection order) and the cases of an earlier run."""

    ids: list[str]
    cases: list[Case]  # the earlier run's cases: most of ids, plus some since deleted


def make_suite(tests: int, seed: int = 23) -> Suite:
    rng = random.Random(seed)
    ids: list[str] = []
    cases: list[Case] = []
    file_no = 0
    while len(ids) < tests:
        pkg = f"tests/p{file_no % 13}/s{file_no % 7}"
        path = f"{pkg}/test_m{file_no}.py"
        dotted = path[:-3].replace("/", ".")
        for j in range(min(rng.randint(10, 70), tests - len(ids))):
            cls = f"TestK{rng.randrange(4)}" if rng.random() < 0.5 else ""
            name = f"test_case{j}"
            r = rng.random()
            if r < 0.2:
                name += f"[p{rng.randrange(8)}]"
            elif r < 0.22:
                name += f"[a::b/{rng.randrange(3)}-x.y]"
            test_id = "::".join([path, *([cls] if cls else []), name])
            classname = f"{dotted}.{cls}" if cls else dotted
            case = Case(test_id, classname, name, path, 10 + 3 * j)
            in_report = rng.random() < 0.95  # else new since the report
            if in_report:
                cases.append(case)
            if rng.random() < 0.98 or not in_report:  # else deleted since
                ids.append(test_id)
        file_no += 1
    ids = list(dict.fromkeys(ids))
    return Suite(ids, cases)


def junit_xml(suite: Suite, seed: int, *, slipstream_properties: bool = False) -> bytes:
    """One run of the suite's cases as pytest writes it (xunit1); ``seed`` varies the times.

    With ``slipstream_properties``, the suite carries the per-file costs and start-up the
    slipstream plugin records, and a few tests an xdist_group property.
    """
    rng = random.Random(seed)
    out: list[str] = []
    total = 0.0
    body: list[str] = []
    files: dict[str, None] = {}
    for case in suite.cases:
        files[case.file] = None
        seconds = rng.lognormvariate(-4.0, 1.6)
        if rng.random() < 0.005:
            seconds += min(30.0, rng.paretovariate(1.3) * 3.0)
        head = (
            f"<testcase classname={quoteattr(case.classname)} name={quoteattr(case.name)} "
            f'file="{case.file}" line="{case.line}" time="{seconds:.3f}"'
        )
        r = rng.random()
        if slipstream_properties and r < 0.002:
            body.append(
                f'{head}><properties><property name="xdist_group" value="g{rng.randrange(20)}"/>'
                "</properties></testcase>"
            )
        elif r < 0.01:
            body.append(
                f'{head}><failure message="assert 1 == 2">def test():\n&gt;  assert 1 == 2\n'
                "E  assert 1 == 2</failure><system-out>some output of the test\n"
                "</system-out></testcase>"
            )
            if rng.random() < 0.5:  # rerun and passed
                body.append(f"{head.replace(f'{seconds:.3f}', f'{seconds * 0.9:.3f}')} />")
        elif r < 0.02:
            body.append(f'{head}><skipped type="pytest.xfail" message="known bug" /></testcase>')
        elif r < 0.03:
            body.append(
                head.replace(f'time="{seconds:.3f}"', 'time="0.000"')
                + '><skipped type="pytest.skip" message="not on this platform">'
                "tests/x.py:3: not on this platform</skipped></testcase>"
            )
        else:
            body.append(f"{head} />")
        total += seconds
    out.append('<?xml version="1.0" encoding="utf-8"?><testsuites>')
    out.append(
        f'<testsuite name="pytest" errors="0" failures="0" skipped="0" '
        f'tests="{len(suite.cases)}" time="{total:.3f}" timestamp="2026-12-06T06:00:00" '
        'hostname="runner">'
    )
    if slipstream_properties:
        out.append("<properties>")
        out.append(f'<property name="slipstream.startup" value="{rng.uniform(1, 3):.3f}"/>')
        for f in files:
            cost = rng.lognormvariate(-2.0, 1.0)
            out.append(f'<property name="slipstream.file_cost:{f}" value="{cost:.3f}"/>')
        out.append("</properties>")
    out.append("\n".join(body))
    out.append("</testsuite></testsuites>\n")
    return "\n".join(out).encode()


def write_inputs(
    directory: pathlib.Path, tests: int, seed: int = 23
) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """``ids.txt``, ``run1.xml`` (plain) and ``run2.xml`` (a later run with the slipstream
    plugin's properties) in directory; returns their paths."""
    suite = make_suite(tests, seed)
    directory.mkdir(parents=True, exist_ok=True)
    ids = directory / "ids.txt"
    ids.write_text("".join(t + "\n" for t in suite.ids))
    run1 = directory / "run1.xml"
    run1.write_bytes(junit_xml(suite, seed + 1))
    run2 = directory / "run2.xml"
    run2.write_bytes(junit_xml(suite, seed + 2, slipstream_properties=True))
    return ids, run1, run2
