"""Drive the real `bazel` (Debian's bazel-bootstrap 4.2.3) against a remote cache.

Reusable by every end-to-end test that needs "the same small build against some
cache endpoint": `write_workspace(tmp_path)` lays out a workspace plus offline
stand-ins for the repositories Bazel 4.2.3 would otherwise download, and returns
a `Bazel` whose `run()` builds argv with all the flags needed here. Typical use:

    bazel = write_workspace(tmp_path)
    try:
        first = bazel.build(remote_cache="grpc://127.0.0.1:1234")
        bazel.clean_expunge()
        second = bazel.build(remote_cache="grpc://127.0.0.1:1234")
        assert second.processes.all_remote_hits
    finally:
        bazel.shutdown()
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import stat
import subprocess
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

BAZEL_TARGETS = ("//...",)

# Larger than the server's max_batch_total_size_bytes (just under 4 MiB), so
# Bazel has to move it over ByteStream Write and Read rather than the batch RPCs.
BIG_OUTPUT_BYTES = 6 * 1024 * 1024

# Bazel's own accounting of non-internal work; every kind but "remote cache hit"
# (and "internal", which never runs a process) means something ran on this machine.
REMOTE_HIT = "remote cache hit"
INTERNAL = "internal"

_PROCESSES_LINE = re.compile(r"^INFO: (\d+) process(?:es)?(?:: (.*?))?\.?$", re.MULTILINE)

# Stand-ins for the repositories @bazel_tools loads from: each re-exports the
# native rules under the names Bazel 4.2.3's tools/ BUILD files load.
_STANDIN_RULES: Mapping[str, tuple[str, Sequence[str]]] = {
    "rules_cc": (
        "cc",
        (
            "cc_binary",
            "cc_import",
            "cc_library",
            "cc_proto_library",
            "cc_test",
            "cc_toolchain",
            "cc_toolchain_suite",
            "objc_library",
        ),
    ),
    "rules_java": (
        "java",
        (
            "java_binary",
            "java_import",
            "java_library",
            "java_proto_library",
            "java_runtime",
            "java_test",
            "java_toolchain",
        ),
    ),
}
_STANDIN_EXTRA_BUILD = {
    # tools/build_defs/cc/cc_import.bzl names this toolchain type.
    "rules_cc": 'alias(\n    name = "toolchain_type",\n'
    '    actual = "@bazel_tools//tools/cpp:toolchain_type",\n'
    '    visibility = ["//visibility:public"],\n)\n',
}

_WORKSPACE_FILES: Mapping[str, str] = {
    "WORKSPACE": 'workspace(name = "slipstream_e2e")\n',
    "tree.bzl": '''\
        """A rule whose only output is a directory (a tree artifact)."""

        def _tree_impl(ctx):
            out = ctx.actions.declare_directory(ctx.label.name)
            ctx.actions.run_shell(
                outputs = [out],
                command = """
                    set -eu
                    mkdir -p "$1/sub/deeper"
                    echo alpha > "$1/a.txt"
                    printf 'beta\\\\n%.0s' $(seq 1 100) > "$1/sub/b.txt"
                    : > "$1/sub/empty.txt"
                    printf '#!/bin/sh\\\\necho tree tool\\\\n' > "$1/sub/deeper/tool.sh"
                    chmod +x "$1/sub/deeper/tool.sh"
                """,
                arguments = [out.path],
                progress_message = "Making tree %s" % ctx.label,
            )
            return [DefaultInfo(files = depset([out]))]

        tree = rule(implementation = _tree_impl)
        ''',
    "BUILD": f"""\
        load(":tree.bzl", "tree")

        genrule(
            name = "greeting",
            outs = ["greeting.txt"],
            cmd = "echo 'hello from slipstream' > $@",
        )

        # An output larger than the batch limit: it must travel over ByteStream.
        genrule(
            name = "big",
            outs = ["big.bin"],
            cmd = "seq 1000000 > $@ && truncate -s {BIG_OUTPUT_BYTES} $@",
        )

        # An executable output made by a genrule.
        genrule(
            name = "script",
            srcs = [":greeting"],
            outs = ["script.sh"],
            cmd = "printf '#!/bin/sh\\\\necho %s\\\\n' \\"$$(cat $<)\\" > $@",
            executable = True,
        )

        cc_library(
            name = "answer",
            srcs = ["answer.c"],
            hdrs = ["answer.h"],
        )

        cc_binary(
            name = "hello",
            srcs = ["main.c"],
            deps = [":answer"],
        )

        tree(name = "tree_out")

        # Consumes the tree artifact: a cache hit needs the whole tree as input.
        genrule(
            name = "tree_listing",
            srcs = [":tree_out"],
            outs = ["tree_listing.txt"],
            cmd = "(cd $< && find -L . -type f | LC_ALL=C sort | xargs cat) > $@",
        )
        """,
    "answer.h": "int answer(void);\n",
    "answer.c": '#include "answer.h"\nint answer(void) { return 42; }\n',
    "main.c": """\
        #include <stdio.h>
        #include "answer.h"
        int main(void) {
            printf("the answer is %d\\n", answer());
            return 0;
        }
        """,
}


@dataclass(frozen=True)
class Processes:
    """Bazel's "INFO: N processes: ..." summary of one build."""

    total: int
    kinds: Mapping[str, int]

    @property
    def remote_hits(self) -> int:
        return self.kinds.get(REMOTE_HIT, 0)

    @property
    def executed(self) -> int:
        """Processes that ran here: neither a cache hit nor an internal action."""
        return sum(n for kind, n in self.kinds.items() if kind not in (REMOTE_HIT, INTERNAL))

    @property
    def all_remote_hits(self) -> bool:
        return self.remote_hits > 0 and self.executed == 0

    @classmethod
    def parse(cls, output: str) -> Processes:
        matches = _PROCESSES_LINE.findall(output)
        if not matches:
            raise AssertionError(f"no 'INFO: N processes' line in bazel output:\n{output}")
        total_s, detail = matches[-1]
        kinds: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in detail.split(","))):
            count, _, kind = part.partition(" ")
            kinds[kind] = kinds.get(kind, 0) + int(count)
        if sum(kinds.values()) != int(total_s):
            raise AssertionError(f"cannot account for {total_s} processes in {detail!r}")
        return cls(int(total_s), kinds)


@dataclass
class BuildResult:
    argv: list[str]
    output: str
    processes: Processes

    @property
    def warnings(self) -> list[str]:
        """Bazel's WARNING and ERROR lines (remote cache trouble shows up only as these)."""
        return [
            line for line in self.output.splitlines() if line.startswith(("WARNING:", "ERROR:"))
        ]


@dataclass
class Bazel:
    """A workspace plus everything needed to run Bazel 4.2.3 on it offline."""

    workspace: pathlib.Path
    output_user_root: pathlib.Path
    standins: Mapping[str, pathlib.Path]
    bazel: str = "bazel"
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 300.0

    def startup_flags(self) -> list[str]:
        return [
            f"--output_user_root={self.output_user_root}",
            # Keep the system rc (/etc/bazel.bazelrc sets the install base); skip the
            # user's and any workspace rc.
            "--nohome_rc",
            "--noworkspace_rc",
            # A stray server exits by itself if a test dies before `bazel shutdown`.
            "--max_idle_secs=120",
        ]

    def build_flags(
        self,
        remote_cache: str | None = None,
        instance_name: str = "",
        grpc_log: pathlib.Path | None = None,
    ) -> list[str]:
        flags = [
            # /etc/bazel/bazelrc turns on --sandbox_debug, which keeps sandboxes around.
            "--nosandbox_debug",
            "--color=no",
            "--curses=no",
            "--noshow_progress",
            "--show_result=0",
            # The action key must not depend on the caller's PATH etc.
            "--incompatible_strict_action_env",
            *(f"--override_repository={name}={path}" for name, path in self.standins.items()),
        ]
        if remote_cache is not None:
            flags += [
                f"--remote_cache={remote_cache}",
                "--remote_timeout=60",
                # Outputs are downloaded (the default; stated so a byte comparison is valid).
                "--remote_download_outputs=all",
            ]
            if instance_name:
                flags.append(f"--remote_instance_name={instance_name}")
            if grpc_log is not None:
                flags.append(f"--experimental_remote_grpc_log={grpc_log}")
        return flags

    def argv(self, command: str, *args: str) -> list[str]:
        return [self.bazel, *self.startup_flags(), command, *args]

    def run(self, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = self.argv(command, *args)
        env = dict(os.environ)
        env.update(self.env)
        proc = subprocess.run(
            argv,
            cwd=self.workspace,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=self.timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-20000:]}"
            )
        return proc

    def build(
        self,
        remote_cache: str | None = None,
        instance_name: str = "",
        grpc_log: pathlib.Path | None = None,
        targets: Sequence[str] = BAZEL_TARGETS,
    ) -> BuildResult:
        flags = self.build_flags(remote_cache, instance_name, grpc_log)
        proc = self.run("build", *flags, "--", *targets)
        return BuildResult(proc.args, proc.stdout, Processes.parse(proc.stdout))

    def clean_expunge(self) -> None:
        self.run("clean", "--expunge")

    def shutdown(self) -> None:
        if self.output_user_root.exists():
            self.run("shutdown", check=False)

    def bin_dir(self) -> pathlib.Path:
        return (self.workspace / "bazel-bin").resolve()

    def output_hashes(self) -> dict[str, str]:
        """sha256 and executable bit of every file under bazel-bin, runfiles trees aside.

        Runfiles trees are symlink forests Bazel makes locally; everything else
        under bazel-bin is an action output that a cache hit has to reproduce.
        """
        root = self.bin_dir()
        hashes: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.endswith(".runfiles")]
            for name in filenames:
                path = pathlib.Path(dirpath, name)
                if path.is_symlink():
                    continue
                mode = path.stat().st_mode
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                executable = "x" if mode & stat.S_IXUSR else "-"
                hashes[str(path.relative_to(root))] = f"{digest} {executable}"
        return hashes


def _write(root: pathlib.Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def write_standins(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Write the offline stand-in repositories; returns {name: path} for --override_repository."""
    standins: dict[str, pathlib.Path] = {}
    for name, (package, rules) in _STANDIN_RULES.items():
        repo = root / name
        defs = "".join(f"def {rule}(**kwargs):\n    native.{rule}(**kwargs)\n\n" for rule in rules)
        _write(
            repo,
            {
                "WORKSPACE": f'workspace(name = "{name}")\n',
                "BUILD": "",
                f"{package}/BUILD": _STANDIN_EXTRA_BUILD.get(name, ""),
                f"{package}/defs.bzl": f'"""Offline stand-in for @{name}: native rules."""\n\n'
                + defs.rstrip("\n")
                + "\n",
            },
        )
        standins[name] = repo
    return standins


def write_workspace(tmp_path: pathlib.Path, bazel: str = "bazel") -> Bazel:
    """Lay out the e2e workspace and stand-ins under tmp_path; return a `Bazel` for it."""
    workspace = tmp_path / "workspace"
    _write(workspace, _WORKSPACE_FILES)
    standins = write_standins(tmp_path / "standins")
    return Bazel(
        workspace=workspace,
        output_user_root=tmp_path / "bazel_root",
        standins=standins,
        bazel=bazel,
        # Bazel reads no rc from $HOME with --nohome_rc, but keep its writes there
        # (e.g. ~/.cache) inside tmp_path too.
        env={"HOME": str(tmp_path / "home")},
    )
