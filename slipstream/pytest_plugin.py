"""pytest plugin: ``pytest --shard-index I --shard-total N`` runs only shard I.

Thin glue around ``splitter.algorithm``. With timings (``--shard-timings`` JUnit files,
else the history store), the plan over the tests the timings know is made before
collection, and files owned wholly by other shards are not even collected. Tests the
timings do not know are placed so every runner agrees: a new test in a known file goes
to one of the shards that hold that file (by hash); tests in new files (which every
shard collects) are split among themselves, their heaviest part going to the least
loaded shard. Without timings, the collected tests are split evenly by count.

``--shard-junit PATH`` writes a JUnit report whose cases carry the node id's file (so
they map back exactly) and, as suite properties, the per-file costs measured here:
collection (importing the module) and module/class fixture set-up.
``--shard-record`` appends the same timings to the history.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import xxhash

from slipstream.history_store import load_history, open_store
from slipstream.splitter import ci, history, junit
from slipstream.splitter.algorithm import GRANULARITIES, Plan, split_tests
from slipstream.splitter.history import Estimates, Run, Sample
from slipstream.splitter.ids import file_of, junit_key
from slipstream.splitter.junit import FILE_COST_PROPERTY, GROUP_PROPERTY, STARTUP_PROPERTY
from slipstream.splitter.sources import TimingSource, runs_from_junit

if TYPE_CHECKING:
    from slipstream.client.split_remote import Remote

_WORKER_KEY = "slipstream_file_costs"
_WORKER_GROUPS_KEY = "slipstream_groups"
_WORKER_ELSEWHERE_KEY = "slipstream_sent_elsewhere"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("slipstream", "slipstream test splitting")
    group.addoption("--shard-index", type=int, help="run only this shard, 0-based")
    group.addoption("--shard-total", type=int, help="number of shards")
    group.addoption("--shard-by", choices=GRANULARITIES, default="auto", help="unit of splitting")
    group.addoption(
        "--shard-timings",
        "--timings",
        action="append",
        default=[],
        metavar="PATH",
        help=f"JUnit report(s) with past timings: {junit.PATHS_HELP} (default: the history store)",
    )
    group.addoption(
        "--shard-storage-dir",
        type=pathlib.Path,
        metavar="DIR",
        help="history store directory (default: the cache's, ~/.cache/slipstream). Write "
        "--shard-storage-dir=DIR, with '=': pytest picks its rootdir before plugins are "
        "loaded, takes a separate DIR for a test path, and node ids change",
    )
    group.addoption("--shard-suite", default="default", help="history suite name")
    group.addoption("--shard-record", action="store_true", help="append timings to the history")
    group.addoption("--shard-run-id", help="id shared by the shards of one run (default: CI's)")
    group.addoption("--shard-junit", metavar="PATH", help="write a JUnit report keyed by node id")
    group.addoption(
        "--shard-server",
        metavar="HOST:PORT",
        help="ask this split server for the shard (needs --run-key; falls back to a local "
        "split when it cannot be reached)",
    )
    group.addoption(
        "--run-key",
        help="the CI run's id, e.g. $CI_PIPELINE_ID: every runner of one run gives the same "
        "key, and the server pins the run's plan under it",
    )
    group.addoption(
        "--queue",
        action="store_true",
        help="pull batches from the run's queue on --shard-server (still give --shard-index "
        "and --shard-total: they are the fallback's split)",
    )
    group.addoption(
        "--lease-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="queue mode: a batch not completed within this goes back to the queue "
        "(default: the server's, from the batch's predicted time)",
    )
    group.addoption(
        "--shard-connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for --shard-server before falling back (default 5)",
    )


@dataclass(slots=True)
class _Outcome:
    seconds: float = 0.0
    setup: float = 0.0
    failed: bool = False
    skipped: bool = False


@dataclass(slots=True)
class Sharding:
    """What one shard decided before and after collection."""

    index: int
    total: int
    granularity: str
    source: TimingSource
    runs: list[Run] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plan: Plan | None = None  # over the tests the timings know
    owners: dict[str, list[int]] = field(default_factory=dict)  # file -> shards in plan
    predicted: float | None = None
    count_plan_hash: str | None = None  # the plan by count, when there are no timings
    # -k, -m, --lf, --deselect ...: the tests are known only after collection, so every
    # shard collects everything and the plan is made then (from the timings, if any).
    after_collection: bool = False
    remote: Remote | None = None  # --shard-server: the server decides (splitter.remote)


class SlipstreamPlugin:
    """Registered as ``slipstream-split``; holds the state of one pytest session."""

    def __init__(self, config: pytest.Config, sharding: Sharding | None) -> None:
        self.config = config
        self.sharding = sharding
        self.started = _process_started() or time.time()
        self.collect_costs: dict[str, float] = {}
        self.groups: dict[str, str] = {}  # node id -> xdist_group name
        self.outcomes: dict[str, _Outcome] = {}
        self.is_worker = hasattr(config, "workerinput")
        self.sent_elsewhere = 0  # files not collected and tests deselected: other shards'

    # ---- before collection ----
    def prepare(self) -> None:
        s = self.sharding
        if s is None or s.remote is not None:
            return
        rootpath = self.config.rootpath
        try:
            if s.source.junit:
                s.runs, warnings = runs_from_junit(s.source.junit, None)
            else:
                s.runs, warnings = load_history(s.source.storage_dir, s.source.suite)
        except (FileNotFoundError, ValueError) as exc:
            raise pytest.UsageError(f"slipstream: {exc}") from None
        s.warnings.extend(warnings)
        recent = history.merge_runs(s.runs)[-s.source.last_runs :]
        exists: dict[str, bool] = {}  # file -> is a file here: one stat each, not per test

        def present(test: str) -> bool:
            f = file_of(test)
            got = exists.get(f)
            if got is None:
                got = exists[f] = (rootpath / f).is_file()
            return got

        known = {t for run in recent for t in run.tests if present(t)}
        if not known:
            s.warnings.append("no timings for this suite: splitting evenly by count")
            return
        if _narrowed_after_collection(self.config):
            s.after_collection = True
            return
        selected = _selected_by_paths(self.config)
        if selected is None:  # a path outside the rootdir: which tests it holds is unknown
            s.after_collection = True
            return
        known = {t for t in known if selected(t)}
        if not known:
            s.warnings.append("no timings for the selected tests: splitting evenly by count")
            return
        plan_known(s, known)

    @pytest.hookimpl
    def pytest_ignore_collect(self, collection_path: pathlib.Path) -> bool | None:
        s = self.sharding
        if s is None or s.plan is None or collection_path.suffix != ".py":
            return None
        rel = _relative(collection_path, self.config.rootpath)
        owners = s.owners.get(rel) if rel is not None else None
        if owners is not None and s.index not in owners:
            self.sent_elsewhere += 1
            return True
        return None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Generator[None]:
        started = time.perf_counter()
        yield
        if isinstance(collector, pytest.Module):
            rel = _relative(collector.path, self.config.rootpath)
            if rel is not None:
                self.collect_costs[rel] = time.perf_counter() - started

    # ---- after collection ----
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        ids = [_base_id(item) for item in items]
        for item, nodeid in zip(items, ids, strict=True):
            group = _group_of(item)
            if group is not None:
                self.groups[nodeid] = group
        s = self.sharding
        if s is None:
            return
        if s.remote is not None:
            remote = s.remote
            remote.say = lambda line: _terminal_line(config, line)
            got = remote.select(ids, self.groups)
            s.predicted = remote.predicted
            mine = set(ids) if got is None else got
        else:
            mine = select(s, ids, self.groups)
        keep = [item for item, nodeid in zip(items, ids, strict=True) if nodeid in mine]
        drop = [item for item, nodeid in zip(items, ids, strict=True) if nodeid not in mine]
        if drop:
            config.hook.pytest_deselected(items=drop)
            self.sent_elsewhere += len(drop)
        items[:] = keep
        if s.count_plan_hash is not None:
            _terminal_line(
                config,
                f"slipstream split: shard {s.index}: {len(keep)} of {len(ids)} tests, "
                f"by count; plan {s.count_plan_hash}",
            )
        elif s.after_collection and s.plan is not None:
            _terminal_line(
                config,
                f"slipstream split: shard {s.index}: {len(keep)} of {len(ids)} collected "
                f"tests; {_plan_summary(s.plan, s.index)}",
            )

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        for line in self.header_lines():
            _terminal_line(self.config, line)

    def header_lines(self) -> list[str]:
        """The warnings and the plan line every shard prints (with its hash)."""
        s = self.sharding
        if s is None:
            return []
        lines = [f"slipstream split: warning: {w}" for w in s.warnings]
        if s.remote is not None:
            return lines  # the shard line comes after collection
        if s.after_collection:
            lines.append(
                f"slipstream split: shard {s.index} of 0..{s.total - 1}, planned from the "
                "timings once every shard has collected the selected tests"
            )
        elif s.plan is None:
            lines.append(f"slipstream split: shard {s.index} of 0..{s.total - 1}, even by count")
        else:
            lines.append(
                f"slipstream split: shard {s.index} of 0..{s.total - 1}: "
                f"{_plan_summary(s.plan, s.index)} (known tests)"
            )
        return lines

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool | None:
        """Queue mode: run what the queue leases instead of every collected item."""
        s = self.sharding
        remote = s.remote if s is not None else None
        if remote is None or not remote.queue_joined:
            return None
        if session.testsfailed and not session.config.option.continue_on_collection_errors:
            raise session.Interrupted(f"{session.testsfailed} errors during collection")
        if session.config.option.collectonly:
            return True
        items = {_base_id(item): item for item in session.items}
        remote.run_queue(session, items, self._sample)
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
        return True

    def _sample(self, nodeid: str) -> Sample | None:
        got = self.outcomes.get(nodeid)
        return None if got is None else Sample(got.seconds, got.failed)

    # ---- results ----
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.is_worker:
            return
        got = self.outcomes.setdefault(report.nodeid, _Outcome())  # may end "@group"
        got.seconds += report.duration
        if report.when == "setup":
            got.setup += report.duration
        if report.failed:
            got.failed = True
        elif report.skipped and report.when != "teardown":
            got.skipped = True

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.is_worker:
            workeroutput: dict[str, Any] = getattr(self.config, "workeroutput", {})
            workeroutput[_WORKER_KEY] = json.dumps(self.collect_costs)
            workeroutput[_WORKER_GROUPS_KEY] = json.dumps(self.groups)
            workeroutput[_WORKER_ELSEWHERE_KEY] = str(self.sent_elsewhere)
            return
        s = self.sharding
        if (
            s is not None
            and session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED
            and self.sent_elsewhere
        ):
            # More shards than units to run: an empty shard is not a failed job.
            session.exitstatus = pytest.ExitCode.OK
            _terminal_line(
                self.config,
                f"slipstream split: shard {s.index} of 0..{s.total - 1} has no tests: every "
                "selected test went to another shard (exit status 0)",
            )

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        raw = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
        if raw:
            for f, seconds in json.loads(raw).items():
                # Every worker imports the file; the cheapest import is the cost itself.
                old = self.collect_costs.get(f)
                self.collect_costs[f] = seconds if old is None else min(old, seconds)
        self.groups.update(
            json.loads(getattr(node, "workeroutput", {}).get(_WORKER_GROUPS_KEY, "{}"))
        )
        elsewhere = int(getattr(node, "workeroutput", {}).get(_WORKER_ELSEWHERE_KEY, "0"))
        self.sent_elsewhere = max(self.sent_elsewhere, elsewhere)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.is_worker:
            return
        wall = time.time() - self.started
        opts = config.option
        if opts.shard_junit or opts.shard_record:
            run = self.run(wall)
            if opts.shard_junit:
                write_junit(run, pathlib.Path(opts.shard_junit))
            remote = self.sharding.remote if self.sharding is not None else None
            if opts.shard_record and remote is not None:
                remote.upload(run, write_junit)
            elif opts.shard_record:
                source = _source(config)
                try:
                    store = open_store(source.storage_dir)
                    try:
                        history.append_run(store, source.suite, run)
                    finally:
                        store.close()
                except (OSError, ValueError) as exc:
                    _terminal_line(config, f"slipstream split: could not record timings: {exc}")
        s = self.sharding
        if s is not None:
            predicted = (
                f"predicted {s.predicted:.2f}s"
                if s.predicted is not None
                else "no prediction: no timings for these tests"
            )
            _terminal_line(
                config,
                f"slipstream split: shard {s.index}: wall {wall:.2f}s since the process started "
                f"({predicted})",
            )

    def _unsuffixed(self, nodeid: str) -> str:
        # xdist's --dist loadgroup reports "id@group"; the history keeps plain node ids.
        base, at, group = nodeid.rpartition("@")
        return base if at and self.groups.get(base) == group else nodeid

    def run(self, wall: float) -> Run:
        """This session's timings as a history run, per-file costs split out of tests.

        Start-up is what the wall time leaves after files and tests; it is only known
        when tests ran one after another (no xdist workers).
        """
        tests: dict[str, Sample] = {}
        setups: dict[str, list[tuple[float, str]]] = {}
        for reported, got in self.outcomes.items():
            if not got.failed and not history.ran(
                "skipped" if got.skipped else "passed", got.seconds
            ):
                continue
            nodeid = self._unsuffixed(reported)
            tests[nodeid] = Sample(got.seconds, got.failed)
            setups.setdefault(file_of(nodeid), []).append((got.setup, nodeid))
        file_costs = dict(self.collect_costs)
        for f, pairs in setups.items():
            # Module/class fixtures land on the first test of their scope: the set-up
            # above the file's usual set-up is a cost of the file, not of that test.
            pairs.sort()
            usual = pairs[len(pairs) // 2][0]
            top, top_id = pairs[-1]
            extra = top - usual if len(pairs) > 1 else 0.0
            if extra > 0:
                tests[top_id] = Sample(tests[top_id].seconds - extra, tests[top_id].failed)
            file_costs[f] = file_costs.get(f, 0.0) + extra
        opts = self.config.option
        run_id = opts.shard_run_id or opts.run_key or ci.run_id_from_env(os.environ)
        startup = None
        if not self.config.pluginmanager.hasplugin("dsession"):
            startup = wall - math.fsum(s.seconds for s in tests.values())
            startup = max(0.0, startup - math.fsum(file_costs.values()))
        groups = {t: g for t, g in self.groups.items() if t in tests}
        return Run(run_id, time.time_ns(), tests, file_costs, startup, groups)


def _terminal_line(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


_PATH_OPTIONS = ("--shard-timings", "--timings", "--shard-storage-dir", "--shard-junit")


def _rootdir_warning(config: pytest.Config) -> str | None:
    """pytest picks the rootdir before plugins' options are known, so in ``--opt PATH``
    it takes PATH for a test path; a PATH outside the current directory then moves the
    rootdir, and with it every node id. ``--opt=PATH`` is safe."""
    args = list(config.invocation_params.args)
    here = config.invocation_params.dir.resolve()
    for option, value in itertools.pairwise(args):
        if option in _PATH_OPTIONS:
            path = (here / value).resolve()
            if path != here and here not in path.parents:
                return (
                    f"write {option}={value} with '=': pytest took {value} for a test path "
                    f"and chose the rootdir {config.rootpath}, which changes node ids"
                )
    return None


def _plan_summary(plan: Plan, index: int) -> str:
    return (
        f"predicted {plan.shards[index].predicted:.2f}s; makespan {plan.makespan:.2f}s, "
        f"lower bound {plan.lower_bound:.2f}s, ratio {plan.ratio:.3f}; plan {plan.plan_hash}"
    )


def _narrowed_after_collection(config: pytest.Config) -> bool:
    """Whether options drop tests from the paths given (-k, -m, --lf, --deselect,
    --ignore, ...): then which tests run is known only after collection."""
    opts = config.option
    return bool(
        getattr(opts, "keyword", "")
        or getattr(opts, "markexpr", "")
        or getattr(opts, "deselect", None)
        or getattr(opts, "lf", False)
        or getattr(opts, "ignore", None)
        or getattr(opts, "ignore_glob", None)
        or getattr(opts, "stepwise", False)
    )


def _selected_by_paths(config: pytest.Config) -> Callable[[str], bool] | None:
    """Whether a test id is under the paths (or node ids) pytest was given; None when a
    path lies outside the rootdir (the ids it would collect cannot be told)."""
    here = config.invocation_params.dir
    prefixes: list[str] = []
    for arg in config.args:
        path, sep, rest = str(arg).partition("::")
        rel = _relative((here / path).resolve(), config.rootpath.resolve())
        if rel is None:
            return None
        if sep:
            prefixes.append(f"{rel}::{rest}")
        elif rel == ".":
            return lambda test: True
        else:
            prefixes.append(rel)

    def selected(test: str) -> bool:
        return any(test == p or test.startswith((p + "::", p + "/", p + "[")) for p in prefixes)

    return selected


def _group_of(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    if mark is None:
        return None
    return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))


def _base_id(item: pytest.Item) -> str:
    """The node id without the "@group" xdist's --dist loadgroup appends."""
    group = _group_of(item)
    if group is not None and item.nodeid.endswith("@" + group):
        return item.nodeid[: -len(group) - 1]
    return item.nodeid


def _relative(path: pathlib.Path, root: pathlib.Path) -> str | None:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def _source(config: pytest.Config) -> TimingSource:
    opts = config.option
    return TimingSource(
        junit=tuple(opts.shard_timings), storage_dir=opts.shard_storage_dir, suite=opts.shard_suite
    )


def _plan(
    estimates: Estimates, s: Sharding, groups: dict[str, str], *, with_startup: bool = True
) -> Plan:
    return split_tests(
        estimates.tests,
        s.total,
        s.granularity,  # type: ignore[arg-type]
        file_costs=estimates.file_costs,
        groups=groups,
        startup=estimates.startup if with_startup else 0.0,
    )


def _process_started() -> float | None:
    """The time.time() at which this process started (Linux), else None."""
    try:
        stat = pathlib.Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def plan_known(s: Sharding, known: set[str]) -> None:
    """The plan over the tests the timings know (whose files exist), made before collection."""
    estimates = history.estimate(
        known, s.runs, last_runs=s.source.last_runs, percentile=s.source.percentile
    )
    groups = history.groups_of(s.runs, last_runs=s.source.last_runs)
    s.plan = _plan(estimates, s, {t: g for t, g in groups.items() if t in known})
    s.predicted = s.plan.shards[s.index].predicted
    for shard in s.plan.shards:
        for f in shard.files:
            s.owners.setdefault(f, []).append(shard.index)


def select(s: Sharding, ids: list[str], groups: dict[str, str]) -> set[str]:
    """The collected ids that belong to this shard (see the module docstring)."""
    if s.after_collection:
        estimates = history.estimate(
            ids, s.runs, last_runs=s.source.last_runs, percentile=s.source.percentile
        )
        s.plan = _plan(estimates, s, groups)
        s.predicted = s.plan.shards[s.index].predicted
        return set(s.plan.shards[s.index].tests)
    if s.plan is None:
        even = split_tests(
            dict.fromkeys(ids, 1.0),
            s.total,
            s.granularity,  # type: ignore[arg-type]
            groups=groups,
        )
        s.count_plan_hash = even.plan_hash
        return set(even.shards[s.index].tests)
    planned = s.plan.shard_of()
    mine: set[str] = set()
    new_files: list[str] = []
    for test in ids:
        shard = planned.get(test)
        if shard is None:
            owners = s.owners.get(file_of(test))
            if owners is None:
                new_files.append(test)
                continue
            digest = xxhash.xxh64_intdigest(test.encode("utf-8", "surrogatepass"))
            shard = owners[digest % len(owners)]
        if shard == s.index:
            mine.add(test)
    s.predicted = s.plan.shards[s.index].predicted
    if new_files:
        estimates = history.estimate(new_files, s.runs)
        new = set(new_files)
        extra = _plan(
            estimates, s, {t: g for t, g in groups.items() if t in new}, with_startup=False
        )
        # The heaviest part of the new tests goes to the least loaded shard.
        heavy = sorted(extra.shards, key=lambda sh: (-sh.predicted, sh.index))
        light = sorted(s.plan.shards, key=lambda sh: (sh.predicted, sh.index))
        for part, target in zip(heavy, light, strict=True):
            if target.index == s.index:
                mine.update(part.tests)
                s.predicted += part.predicted
    return mine


def write_junit(run: Run, path: pathlib.Path) -> None:
    """A JUnit report of a run: cases keyed by node id (file attribute), file costs as
    suite properties."""
    suite = ET.Element("testsuite", name="slipstream", tests=str(len(run.tests)))
    props = ET.SubElement(suite, "properties")
    if run.startup is not None:
        ET.SubElement(props, "property", name=STARTUP_PROPERTY, value=f"{run.startup:.6f}")
    for f, cost in sorted(run.file_costs.items()):
        ET.SubElement(props, "property", name=FILE_COST_PROPERTY + f, value=f"{cost:.6f}")
    for nodeid, sample in sorted(run.tests.items()):
        key = junit_key(nodeid)
        classname, name = key if key else ("", nodeid)
        case = ET.SubElement(
            suite,
            "testcase",
            classname=classname,
            name=name,
            file=file_of(nodeid),
            time=f"{sample.seconds:.6f}",
        )
        if sample.failed:
            ET.SubElement(case, "failure", message="failed")
        if nodeid in run.groups:
            case_props = ET.SubElement(case, "properties")
            ET.SubElement(case_props, "property", name=GROUP_PROPERTY, value=run.groups[nodeid])
    root = ET.Element("testsuites")
    root.append(suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def pytest_configure(config: pytest.Config) -> None:
    opts = config.option
    index, total = opts.shard_index, opts.shard_total
    sharding = None
    if index is not None or total is not None:
        if index is None or total is None:
            raise pytest.UsageError("slipstream: give both --shard-index and --shard-total")
        try:
            ci.check_shard(index, total)
        except ValueError as exc:
            raise pytest.UsageError(f"slipstream: {exc}") from None
        sharding = Sharding(index, total, opts.shard_by, _source(config))
        warning = _rootdir_warning(config)
        if warning:
            sharding.warnings.append(warning)
    if opts.shard_server or opts.run_key or opts.queue:
        sharding = _with_remote(config, sharding)
    if sharding is None and not (opts.shard_junit or opts.shard_record):
        return
    plugin = SlipstreamPlugin(config, sharding)
    plugin.prepare()
    config.pluginmanager.register(plugin, "slipstream-split")


def _with_remote(config: pytest.Config, sharding: Sharding | None) -> Sharding:
    """The sharding with its server settings; UsageError for an incomplete set."""
    # Imported here: gRPC and the client are not needed by runs without a server.
    from slipstream.client.split_remote import Remote
    from slipstream.core.addresses import server_address

    opts = config.option
    if not (opts.shard_server and opts.run_key):
        raise pytest.UsageError("slipstream: give both --shard-server and --run-key")
    if sharding is None:
        raise pytest.UsageError(
            "slipstream: --shard-server needs --shard-index and --shard-total "
            "(in queue mode too: they are the split used when the server is unreachable)"
        )
    if opts.lease_timeout < 0 or opts.shard_connect_timeout <= 0:
        raise pytest.UsageError("slipstream: timeouts must be positive")
    try:
        address = server_address(opts.shard_server)
    except ValueError as exc:
        raise pytest.UsageError(f"slipstream: {exc}") from None
    sharding.remote = Remote(
        address=address,
        run_key=opts.run_key,
        suite=opts.shard_suite,
        index=sharding.index,
        total=sharding.total,
        granularity=opts.shard_by,
        queue=opts.queue,
        lease_timeout=opts.lease_timeout,
        connect_timeout=opts.shard_connect_timeout,
        timings=tuple(opts.shard_timings),
    )
    return sharding
