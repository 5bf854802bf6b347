"""The test side installs into a project's own test venv and changes none of its packages.

The wheel is built from this checkout and installed, without extras, into fresh venvs
that already hold pytest, python-dateutil 4.0.0 (botocore pins it below 3) and a
protobuf release of an older major version. Nothing installed may change. Then a project
with its own top-level `client`, `splitter` and `cache_server` packages runs as three
shards: locally, from another working directory with --rootdir, and from a running
split server. The shards together run every test exactly once.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from tests.support.server_process import ServerProcess, running

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARDS = 3
# The packages a project's venv already holds, pinned as such a project pins them.
PROJECT_PINS = {
    "protobuf-5": ["pytest", "python-dateutil==4.0.0", "protobuf==5.29.6"],
    "protobuf-6": ["pytest", "python-dateutil==4.0.0", "protobuf==6.33.6"],
}


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc  # type: ignore[no-any-return]


def _installed(python: pathlib.Path) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"
    )
    # Run away from this checkout, whose folders and metadata are not in the venv.
    return dict(json.loads(_run([str(python), "-c", script], cwd=python.parents[2]).stdout))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)])
    (found,) = out.glob("slipstream-*.whl")
    return found


def _venv_with(
    root: pathlib.Path, wheel: pathlib.Path, pins: list[str]
) -> tuple[pathlib.Path, dict[str, str], dict[str, str]]:
    """A venv holding pins, then the wheel: its python, and the packages before and after."""
    _run([sys.executable, "-m", "venv", str(root)])
    python = root / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, *pins])
    before = _installed(python)
    _run([*pip, str(wheel)])
    return python, before, _installed(python)


def _write_project(root: pathlib.Path) -> set[str]:
    """A project whose own packages are named client, splitter and cache_server."""
    for package in ("client", "splitter", "cache_server"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(f"NAME = {package!r}\n")
    (root / "pytest.ini").write_text("[pytest]\npythonpath = .\n")
    tests = root / "tests"
    tests.mkdir()
    expected = set()
    for package in ("client", "splitter", "cache_server"):
        body = [f"from {package} import NAME\n"]
        for n in range(4):
            body.append(f"\n\ndef test_{package}_{n}():\n    assert NAME == {package!r}\n")
            expected.add(f"tests.test_{package}::test_{package}_{n}")
        (tests / f"test_{package}.py").write_text("".join(body))
    return expected


def _ran(report: pathlib.Path) -> list[str]:
    cases = ET.parse(report).getroot().iter("testcase")
    return [f"{c.get('classname')}::{c.get('name')}" for c in cases if not list(c)]


def _shards(
    python: pathlib.Path, cwd: pathlib.Path, args: list[str], out: pathlib.Path
) -> list[str]:
    """Run every shard; returns the tests that passed, over all shards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV_", "COVERAGE"))}
    out.mkdir(exist_ok=True)
    ran: list[str] = []
    for index in range(SHARDS):
        report = out / f"shard-{index}.xml"
        cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        cmd += [f"--shard-index={index}", f"--shard-total={SHARDS}", f"--junitxml={report}"]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, f"shard {index}:\n{proc.stdout}\n{proc.stderr}"
        ran += _ran(report)
    return ran


@pytest.fixture(scope="module")
def light_venvs(
    wheel: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[pathlib.Path, dict[str, str], dict[str, str]]]]:
    root = tmp_path_factory.mktemp("venvs")
    yield {name: _venv_with(root / name, wheel, pins) for name, pins in PROJECT_PINS.items()}


@pytest.mark.parametrize("kind", sorted(PROJECT_PINS))
def test_installing_adds_packages_and_changes_none(
    light_venvs: dict[str, tuple[pathlib.Path, dict[str, str], dict[str, str]]], kind: str
) -> None:
    python, before, after = light_venvs[kind]
    changed = {name: (v, after.get(name)) for name, v in before.items() if after.get(name) != v}
    assert not changed, f"installing slipstream changed {changed}"
    assert "slipstream" in after
    # Nothing of ours is a generic top-level name.
    for generic in ("client", "splitter", "cache_server", "slipstream_protos"):
        proc = subprocess.run(
            [str(python), "-c", f"import {generic}"], capture_output=True, cwd=python.parents[2]
        )
        assert proc.returncode != 0, f"{generic} is importable from the wheel"
    # The server's packages are an extra: `serve` says what to install, in one line.
    serve = subprocess.run(
        [str(python), "-m", "slipstream.cli", "serve"],
        capture_output=True,
        text=True,
        cwd=python.parents[2],
    )
    assert serve.returncode == 2
    assert serve.stderr.count("\n") == 1 and "slipstream[server]" in serve.stderr, serve.stderr


def test_a_project_with_the_same_package_names_runs_as_shards(
    light_venvs: dict[str, tuple[pathlib.Path, dict[str, str], dict[str, str]]],
    tmp_path: pathlib.Path,
) -> None:
    python = light_venvs["protobuf-5"][0]
    project = tmp_path / "project"
    expected = _write_project(project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    local = _shards(python, project, ["tests"], tmp_path / "local")
    assert sorted(local) == sorted(expected)

    other_dir = _shards(
        python, elsewhere, [f"--rootdir={project}", str(project / "tests")], elsewhere
    )
    assert sorted(other_dir) == sorted(expected)

    with running(ServerProcess(tmp_path / "store")) as server:
        remote_args = [f"--shard-server={server.address}", "--run-key=run-1", "tests"]
        remote = _shards(python, project, remote_args, tmp_path / "remote")
    assert sorted(remote) == sorted(expected)
