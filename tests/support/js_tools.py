"""The pinned JavaScript build tools (turbo, nx) the end-to-end tests drive, a monorepo for
them, and a CI runner of each (`Turbo`, `Nx`).

tests/support/install_js_tools.sh installs them into a cache directory ($SLIPSTREAM_JS_TOOLS,
else ~/.cache/slipstream/js-tools); .ci/setup runs it, and so does `js_tools()` when they
are missing. A test skips, saying why, only where npm cannot reach its registry.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest

INSTALL = pathlib.Path(__file__).with_name("install_js_tools.sh")


def tools_dir() -> pathlib.Path:
    explicit = os.environ.get("SLIPSTREAM_JS_TOOLS")
    if explicit:
        return pathlib.Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(cache) / "slipstream" / "js-tools"


@functools.cache
def _install() -> str | None:
    """None once the tools are installed; else why not (npm cannot reach its registry)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not installed"
    tools_dir().parent.mkdir(parents=True, exist_ok=True)
    with open(tools_dir().parent / ".js-tools.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers at once: one installs, all wait
        proc = subprocess.run(
            ["bash", str(INSTALL), str(tools_dir())], capture_output=True, text=True, timeout=600
        )
    if proc.returncode == 0:
        return None
    ping = subprocess.run(["npm", "ping"], capture_output=True, text=True, timeout=120)
    if ping.returncode != 0:
        said = (ping.stderr + ping.stdout).splitlines()
        reason = next((line for line in said if "Error:" in line), said[-1] if said else "")
        return f"npm cannot reach its registry ({reason.removeprefix('npm error').strip()})"
    raise AssertionError(f"installing the JavaScript tools failed:\n{proc.stderr[-3000:]}")


def js_tools() -> pathlib.Path:
    """The node_modules holding turbo and nx; skips (saying why) if npm cannot get them."""
    why = _install()
    if why is not None:
        pytest.skip(f"turbo and nx are not installed and cannot be: {why}")
    return tools_dir() / "node_modules"


PACKAGES = {
    "a": [],
    "b": ["a"],  # b depends on a; c on b
    "c": ["b"],
}
BUILD_JS = """\
const fs = require("fs"), path = require("path");
let out = fs.readFileSync("src/index.js", "utf8");
for (const dep of process.argv.slice(2)) {
  out += fs.readFileSync(path.join("..", dep, "dist", "index.js"), "utf8");
}
fs.mkdirSync("dist/assets", {recursive: true});
fs.writeFileSync("dist/index.js", out);
// Different on every real run: a restored output shows it was not rebuilt.
fs.writeFileSync("dist/assets/build-id.txt", `${process.pid}-${Date.now()}-${Math.random()}`);
console.log("built", path.basename(process.cwd()));
"""


def write_monorepo(root: pathlib.Path, configs: dict[str, object]) -> pathlib.Path:
    """A 3-package npm workspace (c -> b -> a) whose build writes dist/, committed to git,
    with configs (file name -> JSON value, e.g. turbo.json) at its root. Skips, saying
    why, before anything else if turbo and nx cannot be had."""
    js_tools()
    root.mkdir(parents=True)
    files = {
        "package.json": '{"name": "mono", "private": true, "packageManager": "npm@10.8.2",'
        ' "workspaces": ["packages/*"]}\n',
        "build.js": BUILD_JS,
        ".gitignore": "node_modules\ndist\n.turbo\n.nx\n",
        **{name: json.dumps(value, indent=2) + "\n" for name, value in configs.items()},
    }
    for name, deps in PACKAGES.items():
        dependencies = ", ".join(f'"{d}": "*"' for d in deps)
        files[f"packages/{name}/package.json"] = (
            f'{{"name": "{name}", "version": "1.0.0", "private": true,'
            f' "dependencies": {{{dependencies}}},'
            f' "scripts": {{"build": "node ../../build.js {" ".join(deps)}"}}}}\n'
        )
        files[f"packages/{name}/src/index.js"] = f"module.exports.{name} = () => '{name}';\n"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "the monorepo")
    return root


def git(cwd: pathlib.Path, *args: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "ci",
        "GIT_AUTHOR_EMAIL": "ci@example.com",
        "GIT_COMMITTER_NAME": "ci",
        "GIT_COMMITTER_EMAIL": "ci@example.com",
    }
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=60)


def clone(origin: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """A fresh clone: the sources, no outputs, no local cache."""
    git(origin.parent, "clone", "-q", str(origin), str(dest))
    return dest


def outputs(repo: pathlib.Path) -> dict[str, bytes]:
    """Every file under the packages' dist/ directories, by path."""
    found = {
        str(p.relative_to(repo)): p.read_bytes()
        for p in sorted(repo.glob("packages/*/dist/**/*"))
        if p.is_file()
    }
    assert len(found) == 2 * len(PACKAGES), sorted(found)
    return found


TURBO_JSON = {
    "$schema": "https://turbo.build/schema.json",
    "tasks": {"build": {"dependsOn": ["^build"], "outputs": ["dist/**"]}},
}


class Turbo:
    """`turbo run build` as one CI runner: its own clone and local cache directory."""

    def __init__(self, repo: pathlib.Path, url: str, token: str, team: str) -> None:
        self.repo = repo
        self.binary = js_tools() / ".bin" / "turbo"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TURBO_")},
            "TURBO_API": url,
            "TURBO_TOKEN": token,
            "TURBO_TEAM": team,
            "TURBO_CACHE_DIR": str(repo.parent / f"{repo.name}-turbo-cache"),
            "TURBO_TELEMETRY_DISABLED": "1",
            "DO_NOT_TRACK": "1",
            "TURBO_NO_UPDATE_NOTIFIER": "1",
            "TURBO_UI": "false",
            "TURBO_PRINT_VERSION_DISABLED": "1",
        }

    def build(self, **env: str) -> tuple[str, int]:
        """Run the build; (turbo's output, how many tasks it says came from the cache)."""
        proc = subprocess.run(
            [str(self.binary), "run", "build"],
            cwd=self.repo,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        m = re.search(r"Cached:\s+(\d+) cached, (\d+) total", out)
        assert m is not None and m.group(2) == "3", out
        return out, int(m.group(1))


NX_JSON = {
    "targetDefaults": {
        "build": {"dependsOn": ["^build"], "outputs": ["{projectRoot}/dist"], "cache": True}
    }
}


STATIC = ("--output-style=static",)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Nx:
    """`nx run-many -t build` as one CI runner: its own clone and local cache directory."""

    def __init__(self, repo: pathlib.Path, url: str, token: str) -> None:
        self.repo = repo
        # The clone's own node_modules links nx in, so nothing nx writes there is shared.
        (repo / "node_modules").mkdir()
        (repo / "node_modules" / "nx").symlink_to(js_tools() / "nx")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("NX_")},
            "NX_SELF_HOSTED_REMOTE_CACHE_SERVER": url,
            "NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN": token,
            "NX_CACHE_DIRECTORY": str(repo.parent / f"{repo.name}-nx-cache"),
            "NX_DAEMON": "false",
            "NX_NO_CLOUD": "true",
            "NX_TUI": "false",
            "CI": "true",
            "NO_COLOR": "1",
        }

    def build(self) -> tuple[str, set[str]]:
        """Run the build; (nx's output, the projects nx says came from the remote cache)."""
        proc = subprocess.run(
            ["node", "node_modules/nx/dist/bin/nx.js", "run-many", "-t", "build", *STATIC],
            cwd=self.repo,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = ANSI.sub("", proc.stdout + proc.stderr)
        assert proc.returncode == 0, out
        assert "Successfully ran target build for 3 projects" in out, out
        return out, set(re.findall(r"nx run (\w+):build\s+\[remote cache\]", out))
