"""Drive the real Pants 2.17.1 (from PyPI, in its own Python 3.9 venv) against a remote cache.

Pants 2.17.1 is the last release that runs from a virtualenv; it needs Python 3.9.
`ensure_pants()` makes (or reuses) a venv with `pantsbuild.pants==2.17.1` and a PEX
of the `pex` tool at the version Pants 2.17.1 expects (its Python backend would
otherwise download that PEX from the internet), and `write_project()` lays out a
tiny project whose pants.toml keeps every state directory inside the test's tmp
dir and needs nothing from the network:

    install = ensure_pants(find_python39())
    project = write_project(tmp_path, install, remote_store="grpc://127.0.0.1:1234")
    first = project.run()
    project.wipe_local_state()
    second = project.run("--no-local-cache")
    assert second.counters["remote_cache_requests_cached"] == ...

Processes that Pants never caches (binary discovery, interpreter discovery: their
cache scope is per-restart) always run locally and never reach the remote cache;
every other process goes through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tests.suite_cache import suite_cache_dir

PANTS_VERSION = "2.17.1"
# `[pex-cli].default_version` of Pants 2.17.1 (pants/backend/python/util_rules/pex_cli.py);
# version_constraints there are ">=2.1.135,<3.0".
PEX_VERSION = "2.1.137"

PANTS_GOALS = ("export-codegen", "package", "::")

# Larger than Pants' default remote_store_batch_api_size_limit (4 MiB) and the
# server's batch limit, so this output travels over ByteStream Write and Read.
BIG_OUTPUT_BYTES = 6 * 1024 * 1024

# The processes of PANTS_GOALS that go through the remote cache (the rest are
# per-restart discovery processes that Pants never caches). INFO-level workunits.
CACHEABLE_PROCESSES = (
    "Running the `shell_command` at `//:greeting`",
    "Building local_dists.pex",
    "Building hello/hello.pex",
    "Running the `adhoc_tool` at hello:hello_out",
)

# Each cacheable process that the test wrote sleeps a while, so that when Pants
# speculatively starts it locally next to the remote cache lookup (it does so at
# once: the speculation delay of every 2.17 process is 0) a cache hit always wins.
SHELL_SLEEP_SECONDS = 3
PEX_SLEEP_SECONDS = 2

_COUNTER_LINE = re.compile(r"^  ([a-z_]+): (\d+)$")
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d\d \[(\w+)\] (.*)$")

_PROJECT_FILES: Mapping[str, str] = {
    "BUILD": f"""\
        shell_command(
            name="greeting",
            command=(
                "sleep {SHELL_SLEEP_SECONDS}"
                " && echo hello from pants > greeting.txt"
                " && mkdir -p tree/sub/deeper"
                " && echo alpha > tree/a.txt"
                " && seq 1 100 > tree/sub/b.txt"
                " && : > tree/sub/empty.txt"
                " && printf '#!/bin/sh\\\\necho tree tool\\\\n' > tree/sub/deeper/tool.sh"
                " && chmod +x tree/sub/deeper/tool.sh"
                " && seq 1000000 > big.bin && truncate -s {BIG_OUTPUT_BYTES} big.bin"
            ),
            tools=["sleep", "echo", "mkdir", "seq", "printf", "chmod", "truncate"],
            output_files=["greeting.txt", "big.bin"],
            output_directories=["tree"],
        )
        """,
    "hello/BUILD": f"""\
        python_sources(name="lib")

        pex_binary(name="hello", entry_point="main.py")

        # Runs the pex built above (the adhoc backend), and captures what it writes.
        adhoc_tool(
            name="hello_out",
            runnable=":hello",
            args=["hello_out.txt", "{PEX_SLEEP_SECONDS}"],
            output_files=["hello_out.txt"],
        )
        """,
    "hello/main.py": """\
        import sys
        import time

        if len(sys.argv) > 2:
            time.sleep(float(sys.argv[2]))
        with open(sys.argv[1], "w") as f:
            f.write("hello from a pex\\n")
        """,
}


# --- Python 3.9 and the Pants venv -------------------------------------------------


def _is_python39(exe: str) -> bool:
    try:
        out = subprocess.run(
            [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "3.9"


def find_python39() -> str | None:
    """A Python 3.9 interpreter: $SLIPSTREAM_PYTHON39, pyenv's, or python3.9 on PATH."""
    candidates: list[str] = []
    if os.environ.get("SLIPSTREAM_PYTHON39"):
        candidates.append(os.environ["SLIPSTREAM_PYTHON39"])
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    pattern = os.path.join(pyenv_root, "versions", "3.9.*", "bin", "python3.9")
    candidates += sorted(glob.glob(pattern), reverse=True)  # the newest 3.9 first
    on_path = shutil.which("python3.9")
    if on_path:
        candidates.append(on_path)
    for exe in candidates:
        if os.path.isfile(exe) and _is_python39(exe):
            return os.path.realpath(exe)
    return None


@dataclass(frozen=True)
class PantsInstall:
    venv: pathlib.Path
    python39: str
    pex_pex: pathlib.Path
    # Seconds spent installing now; 0.0 when a valid install was reused.
    install_seconds: float

    @property
    def pants(self) -> pathlib.Path:
        return self.venv / "bin" / "pants"

    @property
    def python(self) -> pathlib.Path:
        return self.venv / "bin" / "python"


def _marker_text(python39: str) -> str:
    return f"pantsbuild.pants=={PANTS_VERSION} pex=={PEX_VERSION} python={python39}\n"


def _install_is_valid(venv: pathlib.Path, pex_pex: pathlib.Path, python39: str) -> bool:
    marker = venv / ".slipstream-ok"
    if not marker.is_file() or marker.read_text() != _marker_text(python39):
        return False
    if not pex_pex.is_file() or not (venv / "bin" / "pants").is_file():
        return False
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import pants.version as v; print(v.VERSION)"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return probe.returncode == 0 and probe.stdout.strip() == PANTS_VERSION


def _run_checked(argv: Sequence[str], timeout: float = 900) -> None:
    proc = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-20000:]}")


def ensure_pants(python39: str, root: pathlib.Path | None = None) -> PantsInstall:
    """Make (or reuse, if complete) the Pants venv and the pex PEX under `root`."""
    root = root or suite_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"pants-{PANTS_VERSION}-venv"
    pex_pex = venv / f"pex-{PEX_VERSION}.pex"
    with open(root / f"pants-{PANTS_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _install_is_valid(venv, pex_pex, python39):
            return PantsInstall(venv, python39, pex_pex, 0.0)
        start = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        _run_checked([python39, "-m", "venv", str(venv)])
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        _run_checked([*pip, "install", f"pantsbuild.pants=={PANTS_VERSION}"])
        # A PEX of the pex tool itself, built from the PyPI wheel: what Pants' pex-cli
        # subsystem would download from GitHub releases.
        wheels = venv / "pex-wheel"
        _run_checked([*pip, "download", "--no-deps", "-d", str(wheels), f"pex=={PEX_VERSION}"])
        _run_checked(
            [
                str(venv / "bin" / "pex"),
                "--no-pypi",
                "--find-links",
                str(wheels),
                f"pex=={PEX_VERSION}",
                "--console-script",
                "pex",
                "--output-file",
                str(pex_pex),
            ]
        )
        (venv / ".slipstream-ok").write_text(_marker_text(python39))
        return PantsInstall(venv, python39, pex_pex, time.monotonic() - start)


# --- The project and its runs ------------------------------------------------------


@dataclass
class PantsRun:
    argv: list[str]
    output: str
    seconds: float
    counters: dict[str, int]

    def counter(self, name: str) -> int:
        if name not in self.counters:
            raise AssertionError(f"no counter {name!r} in --stats-log output:\n{self.output}")
        return self.counters[name]

    def log_lines(self, *levels: str) -> list[str]:
        """Messages of Pants' log lines at the given levels (e.g. "WARN", "ERROR")."""
        found = []
        for line in self.output.splitlines():
            m = _LOG_LINE.match(line)
            if m and m.group(1) in levels:
                found.append(m.group(2))
        return found

    def workunits(self, event: str) -> list[str]:
        """Descriptions of the INFO workunits that had `event` ("Completed", "Canceled")."""
        prefix = f"{event}: "
        return [m[len(prefix) :] for m in self.log_lines("INFO") if m.startswith(prefix)]

    def summary(self) -> str:
        nonzero = {k: v for k, v in self.counters.items() if v}
        return f"{self.seconds:.1f}s, counters {nonzero}"


def parse_counters(output: str) -> dict[str, int]:
    """The `--stats-log` block: "[INFO] Counters:" then "  name: value" lines."""
    counters: dict[str, int] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.endswith("[INFO] Counters:"):
            for follow in lines[i + 1 :]:
                m = _COUNTER_LINE.match(follow)
                if not m:
                    break
                counters[m.group(1)] = int(m.group(2))
    if not counters:
        raise AssertionError(f"no --stats-log counters in pants output:\n{output}")
    return counters


def _stat_groups(entry: pathlib.Path) -> tuple[int, int]:
    """(process group, session) of /proc/PID."""
    text = (entry / "stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[2]), int(fields[3])


def _lingering(needles: Sequence[str], group: int | None, exclude: set[int]) -> dict[int, str]:
    """Live processes (not in `exclude`) in process group or session `group`, or whose
    cwd or command line mentions one of `needles`."""
    found: dict[int, str] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            pgrp, session = _stat_groups(entry)
        except (OSError, ValueError, IndexError):
            continue
        if not cmdline:  # a zombie or a kernel thread
            continue
        in_group = group is not None and group in (pgrp, session)
        if in_group or any(n in cmdline or cwd.startswith(n) for n in needles):
            found[int(entry.name)] = cmdline.strip()
    return found


@dataclass
class PantsProject:
    root: pathlib.Path
    state: pathlib.Path
    install: PantsInstall
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 400.0
    # pids never to report as left over (e.g. the cache server, whose argv names tmp_path).
    ignore_pids: set[int] = field(default_factory=set)
    # Processes found still running after a pants run exited (and ended then).
    lingered: dict[int, str] = field(default_factory=dict)

    @property
    def dist(self) -> pathlib.Path:
        return self.root / "dist"

    def run(self, *flags: str, goals: Sequence[str] = PANTS_GOALS) -> PantsRun:
        argv = [str(self.install.pants), "--stats-log", *flags, *goals]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PANTS_")}
        env.update(self.env)
        start = time.monotonic()
        # Its own session, so that anything it leaves behind can be found and ended.
        proc = subprocess.Popen(
            argv,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise AssertionError(
                f"pants timed out after {self.timeout}s:\n{output[-20000:]}"
            ) from None
        finally:
            self.lingered.update(self.end_leftovers(group=proc.pid))
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{output[-20000:]}")
        return PantsRun(argv, output, seconds, parse_counters(output))

    def end_leftovers(self, group: int | None = None) -> dict[int, str]:
        """Find and end what a pants run left running (e.g. a pantsd); returns what was found.

        Only processes of that run's own session, or that name this project or its
        state directory (a pantsd would, and so would a process in a sandbox), are
        looked at: never another user of the shared Pants venv.
        """
        needles = [str(self.root), str(self.state)]
        found = _lingering(needles, group, exclude={os.getpid(), *self.ignore_pids})
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return found

    def wipe_local_state(self) -> None:
        """Remove everything Pants keeps locally: lmdb store, named caches, workdir, dist."""
        shutil.rmtree(self.state, ignore_errors=True)
        shutil.rmtree(self.dist, ignore_errors=True)
        self.state.mkdir(parents=True)

    def output_hashes(self) -> dict[str, str]:
        """sha256 and executable bit of every file under dist/."""
        hashes: dict[str, str] = {}
        for path in sorted(self.dist.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            executable = "x" if path.stat().st_mode & stat.S_IXUSR else "-"
            hashes[str(path.relative_to(self.dist))] = f"{digest} {executable}"
        return hashes


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def pants_toml(
    state: pathlib.Path,
    install: PantsInstall,
    remote_store: str | None,
    instance_name: str = "",
) -> str:
    """pants.toml for running offline, all state under `state`, optionally a remote cache."""
    pex_sha = hashlib.sha256(install.pex_pex.read_bytes()).hexdigest()
    pex_len = install.pex_pex.stat().st_size
    known = [
        f"v{PEX_VERSION}|{plat}|{pex_sha}|{pex_len}"
        for plat in ("linux_x86_64", "linux_arm64", "macos_x86_64", "macos_arm64")
    ]
    remote = ""
    if remote_store is not None:
        remote = textwrap.dedent(
            f"""\
            remote_cache_read = true
            remote_cache_write = true
            remote_store_address = "{remote_store}"
            remote_cache_warnings = "backoff"
            """
        )
        if instance_name:
            remote += f'remote_instance_name = "{instance_name}"\n'
    ignored = [
        "DEPRECATED: Running Pants in an external Python interpreter",
        "Please run with `--plugins=hdrhistogram`",
    ]
    return (
        textwrap.dedent(
            f"""\
            [GLOBAL]
            pants_version = "{PANTS_VERSION}"
            backend_packages = [
                "pants.backend.shell",
                "pants.backend.experimental.adhoc",
                "pants.backend.python",
            ]
            pantsd = false
            watch_filesystem = false
            dynamic_ui = false
            colors = false
            ignore_warnings = {_toml_list(ignored)}
            pants_workdir = "{state}/pants.d"
            pants_subprocessdir = "{state}/pids"
            local_store_dir = "{state}/lmdb_store"
            named_caches_dir = "{state}/named_caches"
            local_execution_root_dir = "{state}/exec"
            pants_distdir = "dist"
            """
        )
        + remote
        + textwrap.dedent(
            f"""\

            [anonymous-telemetry]
            enabled = false

            [python]
            interpreter_constraints = ["==3.9.*"]
            # The pip vendored in pex: no download of another pip.
            pip_version = "20.3.4-patched"

            [python-bootstrap]
            search_path = ["{os.path.dirname(install.python39)}"]

            [python-infer]
            use_rust_parser = true

            [pex-cli]
            version = "v{PEX_VERSION}"
            known_versions = {_toml_list(known)}
            url_template = "file://{install.pex_pex}"
            """
        )
    )


def write_project(
    tmp_path: pathlib.Path,
    install: PantsInstall,
    remote_store: str | None = None,
    instance_name: str = "",
) -> PantsProject:
    """Lay out the project under tmp_path/project (state in tmp_path/state)."""
    root = tmp_path / "project"
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    files = dict(_PROJECT_FILES)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    (root / "pants.toml").write_text(pants_toml(state, install, remote_store, instance_name))
    return PantsProject(
        root=root,
        state=state,
        install=install,
        # Nothing from the caller's ~ (a ~/.pants.rc, ~/.cache/pants) is read or written.
        env={"HOME": str(tmp_path / "home"), "NO_COLOR": "1"},
    )
