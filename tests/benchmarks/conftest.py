"""The benchmark smoke tests keep the peers they install (pytest-split, BuildGrid's venv) in
the suite's one cache, not in the benchmarks' own ~/.cache/slipstream-bench."""

from __future__ import annotations

import pytest

from tests.suite_cache import suite_cache_dir


@pytest.fixture(autouse=True)
def bench_cache_in_the_suite_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIPSTREAM_BENCH_CACHE", str(suite_cache_dir() / "bench"))
