"""Time a test really ran counts, whatever its outcome: xfail, and skips raised after set-up.

The suite shape is the one seen on a real project (issue 23): 8 shards, a file of 40
xfail tests (one of 11 s) that pytest writes as <skipped type="pytest.xfail"> with the
time each ran, beside files of passing tests.
"""

from __future__ import annotations

import random

import pytest

from slipstream.splitter import history, junit
from slipstream.splitter.algorithm import split_tests

SHARDS = 8


def _suite() -> tuple[bytes, dict[str, float]]:
    """A JUnit report and the seconds each test really took."""
    rng = random.Random(23)
    real: dict[str, float] = {}
    cases: list[str] = []
    for f in range(24):
        for t in range(12):
            seconds = round(rng.uniform(0.5, 2.5), 3)
            real[f"tests/test_f{f}.py::test_{t}"] = seconds
            cases.append(
                f'<testcase classname="tests.test_f{f}" name="test_{t}" time="{seconds}"/>'
            )
    for t in range(40):
        seconds = 11.0 if t == 0 else round(rng.uniform(0.6, 1.2), 3)
        real[f"tests/test_known_bugs.py::test_bug_{t}"] = seconds
        cases.append(
            f'<testcase classname="tests.test_known_bugs" name="test_bug_{t}" time="{seconds}">'
            '<skipped type="pytest.xfail" message="known bug"/></testcase>'
        )
    # Skips that did not run: no time, or none to speak of. They stay no timing data.
    cases.append(
        '<testcase classname="tests.test_f0" name="test_never" time="0.000">'
        '<skipped type="pytest.skip" message="not here"/></testcase>'
    )
    cases.append(
        '<testcase classname="tests.test_f0" name="test_untimed">'
        '<skipped message="no time"/></testcase>'
    )
    xml = f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>'
    return xml.encode(), real


def test_xfail_time_counts_and_the_shards_finish_together() -> None:
    xml, real = _suite()
    report = junit.parse_report([xml], "report.xml")
    run = history.run_from_cases(report.cases, created_ns=0, candidates=sorted(real))
    # Every xfail test's time is its own timing, exactly as recorded.
    assert run.tests["tests/test_known_bugs.py::test_bug_0"].seconds == 11.0
    assert not run.tests["tests/test_known_bugs.py::test_bug_0"].failed
    estimates = history.estimate(sorted(real), [run])
    assert estimates.known == len(real)
    plan = split_tests(estimates.tests, SHARDS, "test")
    walls = [sum(real[t] for t in shard.tests) for shard in plan.shards]
    predicted = [shard.predicted for shard in plan.shards]
    assert sum(predicted) == pytest.approx(sum(real.values()))
    # The shards, run for real, finish together: within 10% of the ideal.
    assert max(walls) <= 1.1 * sum(real.values()) / SHARDS, walls


def test_a_skip_without_time_is_no_timing_data() -> None:
    xml, _ = _suite()
    report = junit.parse_report([xml], "report.xml")
    run = history.run_from_cases(report.cases, created_ns=0)
    keys = set(run.tests)
    assert not any(k.endswith(("test_never", "test_untimed")) for k in keys)
    assert any(k.endswith("test_bug_0") for k in keys)


def test_the_plugin_records_the_time_of_xfail_tests(tmp_path) -> None:
    from benchmarks.bench_split import run_pytest
    from slipstream.splitter.ids import node_id
    from slipstream.splitter.junit import read_reports

    (tmp_path / "test_bugs.py").write_text(
        "import time\nimport pytest\n\n\n"
        "@pytest.mark.xfail(reason='known bug')\ndef test_slow_bug():\n"
        "    time.sleep(0.3)\n    assert False\n\n\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped_up_front():\n    pass\n\n\n"
        "def test_fine():\n    pass\n"
    )
    _, proc = run_pytest(tmp_path, "-q", "-p", "no:cacheprovider", "--shard-junit=out.xml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports, _ = read_reports([tmp_path / "out.xml"])
    times = {node_id(c): c.time for c in reports[0].cases}
    assert times["test_bugs.py::test_slow_bug"] is not None
    assert times["test_bugs.py::test_slow_bug"] >= 0.3
    assert "test_bugs.py::test_skipped_up_front" not in times
    assert "test_bugs.py::test_fine" in times
