""".ci/test on a tiny project of its own: the coverage report is printed whatever the tests
did, a failing test fails the script, and a run where no test ran is not a success."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

PYPROJECT = """
[tool.pytest.ini_options]
testpaths = ["tests"]

[tool.coverage.run]
source = ["pkg"]
parallel = true
data_file = ".coverage"
"""


def run_ci_test(root: pathlib.Path, test_body: str | None) -> subprocess.CompletedProcess[str]:
    """.ci/test, as in this checkout, on a project whose one test file holds test_body."""
    (root / ".ci").mkdir()
    for name in ("test", "venv.sh"):
        shutil.copy2(REPO / ".ci" / name, root / ".ci" / name)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("def double(x):\n    return 2 * x\n")
    (root / "tests").mkdir()
    # Imported by the xdist controller too, so the coverage data is never empty.
    (root / "conftest.py").write_text("import pkg\n\npkg.double(1)\n")
    if test_body is not None:
        (root / "tests" / "test_pkg.py").write_text(f"import pkg\n\n\n{test_body}")
    # This run's python (with pytest, xdist and coverage) as python3; none of its settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV", "PYTEST_"))}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return subprocess.run(
        ["bash", str(root / ".ci" / "test")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("test_body", "code", "says"),
    [
        ("def test_double():\n    assert pkg.double(2) == 4\n", 0, ""),
        ("def test_double():\n    assert pkg.double(2) == 5\n", 1, "the tests failed"),
        (None, 5, "no tests ran"),
    ],
    ids=["pass", "fail", "no-tests"],
)
def test_ci_test_reports_coverage_whatever_the_outcome(
    tmp_path: pathlib.Path, test_body: str | None, code: int, says: str
) -> None:
    proc = run_ci_test(tmp_path, test_body)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "== coverage" in proc.stdout
    assert "pkg/__init__.py" in proc.stdout and "TOTAL" in proc.stdout, proc.stdout
    assert says in proc.stderr
