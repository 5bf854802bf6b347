"""End-to-end: the real ccache (Debian's 4.7.5) uses the HTTP endpoint as its remote storage.

Compile a small C project with `ccache gcc`, wipe ccache's local cache, compile
again: every compilation must be a remote storage hit (ccache's own statistics
say so) and every object file byte-identical. In each of ccache's layouts
(subdirs, flat, bazel), and with tokens (`bearer-token=`): a token with write
scopes fills the cache, a read-only one gets the hits, an unknown one nothing.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.http.helpers import http_server
from tests.ops.helpers import Token, write_token_file
from tests.support.server_process import ServerProcess, http_url, running

CCACHE = shutil.which("ccache")
GCC = shutil.which("gcc")
pytestmark = pytest.mark.skipif(
    CCACHE is None or GCC is None, reason="needs ccache and gcc (CI installs Debian's ccache)"
)

SOURCES = {
    "util.h": "int add(int a, int b);\nint mul(int a, int b);\nconst char *name(void);\n",
    "add.c": '#include "util.h"\nint add(int a, int b) { return a + b; }\n',
    "mul.c": '#include "util.h"\nint mul(int a, int b) { return a * b; }\n',
    "name.c": '#include "util.h"\nconst char *name(void) { return "slipstream"; }\n',
    "table.c": "static const int squares[] = {0, 1, 4, 9, 16, 25, 36, 49, 64, 81};\n"
    "int square(int i) { return squares[i % 10]; }\n",
    "main.c": '#include <stdio.h>\n#include "util.h"\nint square(int i);\n'
    'int main(void) {\n  printf("%s %d %d %d\\n", name(), add(2, 3), mul(4, 5), square(7));\n'
    "  return 0;\n}\n",
}
OBJECTS = [name.replace(".c", ".o") for name in SOURCES if name.endswith(".c")]
WRITER = Token("ci-ccache", "tok-ccache-writer-7a8b", ("read", "cas-write", "ac-write"))
READER = Token("dev-ccache", "tok-ccache-reader-9c0d", ("read",))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running(http_server(tmp_path_factory.mktemp("store"))) as proc:
        yield proc


class Project:
    """The C project and a private ccache configuration for it."""

    def __init__(self, root: pathlib.Path, remote_storage: str) -> None:
        self.src = root / "src"
        self.src.mkdir(parents=True)
        for name, text in SOURCES.items():
            (self.src / name).write_text(text)
        self.cache_dir = root / "ccache"
        config = root / "ccache.conf"
        config.write_text("")  # no user or system settings leak in
        self.env = {
            **os.environ,
            "CCACHE_DIR": str(self.cache_dir),
            "CCACHE_CONFIGPATH": str(config),
            "CCACHE_REMOTE_STORAGE": remote_storage,
            "CCACHE_LOGFILE": str(root / "ccache.log"),
        }

    def ccache(self, *args: str) -> str:
        assert CCACHE is not None
        proc = subprocess.run(
            [CCACHE, *args], cwd=self.src, env=self.env, capture_output=True, text=True, check=True
        )
        return proc.stdout

    def build(self) -> tuple[dict[str, int], dict[str, bytes]]:
        """Compile every source with ccache, link; (ccache's statistics, object files)."""
        assert GCC is not None
        for obj in OBJECTS:
            (self.src / obj).unlink(missing_ok=True)
            self.ccache(GCC, "-O2", "-c", obj.replace(".o", ".c"), "-o", obj)
        subprocess.run([GCC, "-o", "prog", *OBJECTS], cwd=self.src, check=True)
        run = subprocess.run([str(self.src / "prog")], capture_output=True, text=True, check=True)
        assert run.stdout == "slipstream 5 20 49\n"
        stats = {}
        for line in self.ccache("--print-stats").splitlines():
            key, _, value = line.partition("\t")
            stats[key] = int(value)
        return stats, {obj: (self.src / obj).read_bytes() for obj in OBJECTS}

    def wipe_local_cache(self) -> None:
        shutil.rmtree(self.cache_dir)  # the local cache and its statistics


@pytest.mark.parametrize("layout", ["subdirs", "flat", "bazel"])
def test_second_build_after_wiping_the_local_cache_is_all_remote_hits(
    served: ServerProcess, tmp_path: pathlib.Path, layout: str
) -> None:
    project = Project(tmp_path, f"{http_url(served)}/ccache/e2e-{layout}|layout={layout}")
    first, objects = project.build()
    assert first["cache_miss"] == len(OBJECTS), first
    assert first["remote_storage_hit"] == 0, first
    assert first["remote_storage_write"] >= len(OBJECTS), first  # result (+ manifest) each
    assert first["remote_storage_error"] == 0, first

    project.wipe_local_cache()
    second, again = project.build()
    summary = project.ccache("--show-stats")
    assert second["remote_storage_hit"] == len(OBJECTS), summary
    assert second["cache_miss"] == 0 and second["local_storage_hit"] == 0, summary
    assert second["remote_storage_error"] == 0 and second["remote_storage_timeout"] == 0
    assert again == objects
    print(f"\nlayout={layout}, second build:\n{summary}")


def test_bearer_tokens(tmp_path: pathlib.Path) -> None:
    tokens = write_token_file(tmp_path / "tokens.toml", [WRITER, READER])
    server = http_server(tmp_path / "store", ["--token-file", str(tokens)])
    with running(server):
        base = f"{http_url(server)}/ccache|layout=subdirs"

        def project(name: str, token: str) -> Project:
            return Project(tmp_path / name, f"{base}|bearer-token={token}")

        # A read-only token cannot fill the cache: ccache reports failed writes.
        reader_first, _ = project("reader-first", READER.value).build()
        assert reader_first["remote_storage_hit"] == 0
        assert reader_first["remote_storage_error"] >= len(OBJECTS), reader_first

        writer, objects = project("writer", WRITER.value).build()
        assert writer["cache_miss"] == len(OBJECTS) and writer["remote_storage_error"] == 0

        reader, again = project("reader", READER.value).build()
        assert reader["remote_storage_hit"] == len(OBJECTS), reader
        assert again == objects

        stranger, _ = project("stranger", "not-a-token").build()
        assert stranger["remote_storage_hit"] == 0, stranger
