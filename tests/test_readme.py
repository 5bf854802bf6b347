"""The README's first command, as written, sets up and starts the server in a fresh copy of the
checkout with the system's python3 (on Debian, one that refuses `pip install` outside a venv).
pip's own cache is reused, so a warm machine installs without the network."""

from __future__ import annotations

import os
import pathlib
import queue
import shutil
import signal
import subprocess
import threading
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SERVING = "serving the REAPI v2 cache on "


def readme_serve_command() -> str:
    """The indented command line of "The two commands" that runs `slipstream serve`."""
    section = (REPO / "README.md").read_text().split("## The two commands", 1)[1]
    section = section.split("\n## ", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.startswith("    ")]
    (command,) = [c for c in commands if "slipstream serve" in c]
    return command


def system_python3() -> str:
    """Debian's /usr/bin/python3 when it is 3.11+ (what the README is for), else python3 on a
    PATH without this test run's venv."""
    probe = [
        "/usr/bin/python3",
        "-c",
        "import sys; raise SystemExit(sys.version_info < (3, 11))",
    ]
    if os.path.exists(probe[0]) and subprocess.run(probe, check=False).returncode == 0:
        return probe[0]
    venv = os.environ.get("VIRTUAL_ENV", "")
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if venv == "" or venv not in d]
    found = shutil.which("python3", path=os.pathsep.join(path))
    if found is None:
        pytest.skip("no python3 outside this test run's venv to follow the README with")
    return found


def copy_of_checkout(dest: pathlib.Path) -> None:
    """The tracked files as they are now (a fresh clone, uncommitted edits included)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=False
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, so no list of tracked files: {listed.stderr!r}")
    for name in listed.stdout.decode().split("\0"):
        src = REPO / name
        if not name or not (src.exists() or src.is_symlink()):
            continue  # deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)


def test_readme_serve_command_sets_up_and_serves(tmp_path: pathlib.Path) -> None:
    command = readme_serve_command()
    assert command.startswith("python3 -m venv .venv && ")  # the venv is part of it
    checkout = tmp_path / "slipstream"
    copy_of_checkout(checkout)
    python3 = system_python3()
    print(f"following the README with {python3}: {command}")
    # Nothing of this test run's venv or coverage; HOME stays, so pip's cache is reused.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("COV")
    }
    env["PATH"] = os.pathsep.join([os.path.dirname(python3), "/usr/bin", "/bin"])
    # On a free port and in this test's directory: never the user's 9380 or ~/.cache.
    store = tmp_path / "store"
    proc = subprocess.Popen(
        ["bash", "-c", f"{command} --listen 127.0.0.1:0 --storage {store}"],
        cwd=checkout,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    stdout = proc.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stdout:
            lines.put(line)
        lines.put("")  # the output ended

    reader = threading.Thread(target=pump)
    reader.start()
    output: list[str] = []
    deadline = time.monotonic() + 500  # pip downloads grpcio and boto3 when not cached
    try:
        while not any(SERVING in line for line in output):
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise AssertionError("no 'serving' line in time:\n" + "".join(output)) from None
            assert line, f"exited {proc.wait()} before serving:\n" + "".join(output)
            output.append(line)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(output)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join()
        stdout.close()
    assert (checkout / ".venv" / "bin" / "slipstream").exists()
    assert store.is_dir()
