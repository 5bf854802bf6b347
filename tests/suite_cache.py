"""The one place the test suite keeps what it installs to reuse between runs (Pants' venv,
the benchmark tests' peers). Everything else a test makes lives under pytest's tmp_path."""

from __future__ import annotations

import os
import pathlib


def suite_cache_dir() -> pathlib.Path:
    """$SLIPSTREAM_TEST_CACHE, else $XDG_CACHE_HOME/slipstream-tests (~/.cache by default).

    Safe to remove at any time: the next run installs again what it needs.
    """
    if os.environ.get("SLIPSTREAM_TEST_CACHE"):
        return pathlib.Path(os.environ["SLIPSTREAM_TEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base, "slipstream-tests")
