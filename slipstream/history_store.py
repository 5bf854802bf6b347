"""The local timing history: a disk store opened for the CLI and the pytest plugin.

Reading a history creates nothing: a directory that does not exist holds no runs.
Only recording (the plugin's --shard-record) lays out a store.
"""

from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING

from slipstream.splitter import history
from slipstream.splitter.history import Estimates, HistoryError, Run
from slipstream.splitter.sources import TimingSource, estimator_from_junit

if TYPE_CHECKING:
    from slipstream.cache_server.storage.base import Store
    from slipstream.cache_server.storage.disk import DiskStore

# The disk store (and the protobuf it imports) is imported when a store is opened: a
# `slipstream split --junit` never opens one, and each of a matrix's runners pays the
# import.


def _disk_store(root: pathlib.Path, *, create: bool = True) -> DiskStore:
    from slipstream.cache_server.storage.disk import DiskStore

    return DiskStore(root, create=create)


def _default_storage_dir() -> pathlib.Path:
    from slipstream.cache_server.storage.disk import default_storage_dir

    return default_storage_dir()


def open_store(storage_dir: pathlib.Path | None) -> Store:
    """The disk store at storage_dir (the cache's default directory when None), for writing:
    it is created if absent. OSError if it cannot be."""
    return _disk_store(storage_dir or _default_storage_dir())


def _existing_root(storage_dir: pathlib.Path | None) -> pathlib.Path | None:
    """The history's directory, None if it does not exist; HistoryError if not a directory."""
    root = storage_dir or _default_storage_dir()
    try:
        is_dir = stat.S_ISDIR(os.stat(root).st_mode)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise HistoryError(f"history store {root}: a part of that path is a file") from None
    except OSError as exc:
        raise HistoryError(f"history store {root}: {exc.strerror or exc}") from None
    if not is_dir:
        raise HistoryError(f"history store {root} is not a directory")
    return root


def load_history(storage_dir: pathlib.Path | None, suite: str) -> tuple[list[Run], list[str]]:
    """The runs of suite in the store at storage_dir, read without creating anything.

    No runs when the directory does not exist; HistoryError when it is not a directory.
    """
    history.check_suite(suite)
    root = _existing_root(storage_dir)
    if root is None:
        return [], []
    store = _disk_store(root, create=False)
    try:
        return history.load_runs(store, suite)
    except OSError as exc:
        raise HistoryError(f"history store {root}: {exc.strerror or exc}") from None
    finally:
        store.close()


def suites_in(storage_dir: pathlib.Path | None) -> list[str]:
    """The suites the history at storage_dir holds runs of (none if it does not exist)."""
    root = _existing_root(storage_dir)
    if root is None:
        return []
    store = _disk_store(root, create=False)
    try:
        keys = store.list_records(history.NAMESPACE)
    except OSError as exc:
        raise HistoryError(f"history store {root}: {exc.strerror or exc}") from None
    finally:
        store.close()
    return sorted({info.key.partition("/")[0] for info in keys})


def load_estimates(source: TimingSource, tests: Iterable[str]) -> tuple[Estimates, list[str]]:
    """Estimates for tests, and warning lines (unreadable files, no history, ...).

    Raises FileNotFoundError (a JUnit pattern matching nothing) and HistoryError.
    """
    wanted = history.sorted_distinct(tests)
    if source.junit:
        estimator, warnings = estimator_from_junit(
            source.junit, wanted, last_runs=source.last_runs, percentile=source.percentile
        )
        where = "the JUnit reports"
    else:
        runs, warnings = load_history(source.storage_dir, source.suite)
        estimator = history.Estimator(
            runs, last_runs=source.last_runs, percentile=source.percentile
        )
        where = f"the history of suite {source.suite!r}"
    estimates = estimator.estimate(wanted)  # history.estimate(wanted, runs, ...)
    if wanted and not estimates.from_history:
        warnings.append(f"no timings for these tests in {where}: splitting evenly by count")
    return estimates, warnings
