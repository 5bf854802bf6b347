"""How long the pages take to render on a big history.

    python -m benchmarks.bench_pages [--smoke] [--tests N] [--runs N] [--shards N] [--json PATH]

A suite of --tests tests (default 10,000) over --runs runs (default 100) of --shards
shards each, every test timed in every run, a few flaky; rendered by the functions the
server's /ui/ pages and `slipstream report --html` use (splitter.dashboard): the
overview, the newest run, the tests page with a search, and the one-file report. Each
is timed as the best of --repeat renders, from the runs already in memory. Then what a
server's page view reads first: the same uploads as records of a disk store (under
/dev/shm where it is a directory), read by the pages' history reader
(cache_server.services.ui_history) on a first view and again on the next view of the
unchanged history, which reads only what it could not keep (at most 400,000 test
results are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from slipstream.cache_server.services.ui_history import HistoryCache
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.splitter import dashboard, history
from slipstream.splitter.history import Run, Sample

HERE = pathlib.Path(__file__).parent


@dataclass
class Row:
    page: str
    tests: int
    runs: int
    seconds: float  # best of the repeats
    bytes: int


def synthetic_history(tests: int, runs: int, shards: int, seed: int = 1) -> list[Run]:
    """runs x shards uploads; test i runs on shard i % shards with noisy times."""
    rng = random.Random(seed)
    base = [rng.lognormvariate(0.0, 1.2) for _ in range(tests)]
    ids = [f"tests/pkg{i % 97}/test_mod{i % 613}.py::test_case_{i}" for i in range(tests)]
    uploads: list[Run] = []
    for r in range(runs):
        per_shard: list[dict[str, Sample]] = [{} for _ in range(shards)]
        for i, test in enumerate(ids):
            failed = i % 500 == 0 and rng.random() < 0.3  # a few flaky tests
            per_shard[i % shards][test] = Sample(base[i] * rng.uniform(0.8, 1.25), failed)
        for s, timed in enumerate(per_shard):
            created = 1_700_000_000 * 10**9 + r * 3600 * 10**9 + s
            uploads.append(Run(f"run-{r}", created, timed, startup=20.0))
    return uploads


def best_of(repeat: int, render: Callable[[], str]) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        size = len(render())
        best = min(best, time.perf_counter() - start)
    return best, size


def read_views(uploads: list[Run]) -> list[tuple[str, float, int]]:
    """(view, seconds, records read) of a first and a next page view's history read."""
    parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bench-pages-", dir=parent) as tmp:
        store = DiskStore(pathlib.Path(tmp), sync=False)
        try:
            for upload in uploads:
                history.append_run(store, "big", upload)
            reader = HistoryCache(store)
            views = []
            for view in ("read, first view", "read, next view"):
                before = reader.records_read
                start = time.perf_counter()
                runs, _ = reader.load_runs("big")
                views.append((view, time.perf_counter() - start, reader.records_read - before))
                assert len(runs) == min(len(uploads), history.MAX_LOADED_RECORDS)
            return views
        finally:
            store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--tests", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=pathlib.Path, default=HERE / "pages_results.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tests, args.runs, args.shards, args.repeat = 200, 5, 2, 1
    uploads = synthetic_history(args.tests, args.runs, args.shards)
    suites = {"big": uploads}
    links = dashboard.server_links()
    targets = dashboard.Targets()
    newest = dashboard.runs_of(uploads)[-1].key
    pages: dict[str, Callable[[], str]] = {
        "overview": lambda: dashboard.overview_page(suites, targets, links),
        "run": lambda: dashboard.run_page("big", uploads, newest, links) or "",
        "tests": lambda: dashboard.tests_page("big", uploads, links, query="mod7", test=None),
        "report": lambda: dashboard.report(suites, targets),
    }
    rows = []
    for name, render in pages.items():
        seconds, size = best_of(args.repeat, render)
        rows.append(Row(name, args.tests, args.runs, seconds, size))
    print(f"{'page':<10} {'tests':>7} {'runs':>5} {'seconds':>8} {'bytes':>10}")
    for row in rows:
        print(f"{row.page:<10} {row.tests:>7} {row.runs:>5} {row.seconds:>8.3f} {row.bytes:>10,}")
    views = read_views(uploads)
    print(f"{'history':<18} {'seconds':>8} {'records read':>13}")
    for view, seconds, read in views:
        print(f"{view:<18} {seconds:>8.3f} {read:>13,}")
    result = {
        "smoke": args.smoke,
        "shards": args.shards,
        "rows": [asdict(r) for r in rows],
        "reads": [{"view": v, "seconds": s, "records_read": n} for v, s, n in views],
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
