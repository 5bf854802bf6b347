"""Pages a person reads at a glance: the timing history as HTML with inline SVG charts.

Pure: runs in, HTML text out. The cache server's `/ui/` pages and `slipstream report
--html` both render with it. Everything shown is escaped (test ids, run ids and suite
names come from untrusted JUnit files and clients); no page fetches anything (no
script, no external asset), and links go through a `Links` the caller supplies (paths
on the server, anchors in a one-file report).
"""

from __future__ import annotations

import hashlib
import html
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from slipstream.splitter import history
from slipstream.splitter.algorithm import fewest_shards
from slipstream.splitter.history import Run, Sample

# What a page shows of a long list, and how many recent runs it looks at.
TOP = 50
RECENT_RUNS = 30
REPORT_RUNS = 10  # runs a report has a section for
# The Content-Security-Policy every page is served with: no script, nothing fetched.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'"


@dataclass(frozen=True, slots=True)
class Targets:
    """The pipeline's wall-time targets, in seconds."""

    build: float = 10 * 60.0
    test: float = 20 * 60.0
    total: float = 45 * 60.0


@dataclass(frozen=True, slots=True)
class Shard:
    """One upload of a run: what one runner timed."""

    index: int
    tests: Mapping[str, Sample]
    startup: float  # seconds outside files and tests (start-up, collection)
    file_seconds: float  # set-up and tear-down charged to files
    test_seconds: float

    @property
    def wall(self) -> float:
        return self.startup + self.file_seconds + self.test_seconds


@dataclass(frozen=True, slots=True)
class RunView:
    """One CI run of a suite: its shards (uploads sharing a run id) and merged tests."""

    key: str  # a short, path-safe name for links
    run_id: str | None
    created_ns: int
    shards: tuple[Shard, ...]
    tests: Mapping[str, Sample] = field(default_factory=dict)
    uploads: tuple[Run, ...] = ()

    @property
    def wall(self) -> float:
        """The test stage's wall: its slowest shard."""
        return max((s.wall for s in self.shards), default=0.0)

    @property
    def balance(self) -> float:
        """Slowest shard over the mean shard (1.0 is perfect)."""
        walls = [s.wall for s in self.shards]
        mean = math.fsum(walls) / len(walls) if walls else 0.0
        return max(walls) / mean if mean > 0 else 1.0


@dataclass(frozen=True, slots=True)
class Links:
    """Where a page's links go: the server's paths, or a report's anchors."""

    overview: Callable[[], str]
    run: Callable[[str, str], str]  # (suite, run key) -> href
    tests: Callable[[str], str]  # suite -> href
    test: Callable[[str, str], str]  # (suite, test id) -> href
    search: Callable[[str], str] | None = None  # suite -> form action, None: no search box
    nav: tuple[tuple[str, str], ...] = ()  # (label, href) of other pages, for the header


def server_links(root: str = "/ui") -> Links:
    """Links between the server's pages under root."""
    return Links(
        overview=lambda: f"{root}/",
        run=lambda suite, key: f"{root}/s/{quote(suite)}/run/{quote(key)}",
        tests=lambda suite: f"{root}/s/{quote(suite)}/tests",
        test=lambda suite, test: f"{root}/s/{quote(suite)}/tests?test={quote(test, safe='')}",
        search=lambda suite: f"{root}/s/{quote(suite)}/tests",
        nav=(("Cache", f"{root}/cache"),),
    )


def report_links() -> Links:
    """Links within one self-contained report file."""
    return Links(
        overview=lambda: "#overview",
        run=lambda suite, key: f"#run-{_anchor(suite)}-{key}",
        tests=lambda suite: f"#tests-{_anchor(suite)}",
        test=lambda suite, test: f"#tests-{_anchor(suite)}",
    )


def _anchor(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run_key(run_id: str | None, created_ns: int) -> str:
    """A run's name in links: safe in a path whatever its id holds."""
    name = f"id:{run_id}" if run_id is not None else f"ns:{created_ns}"
    return hashlib.sha256(name.encode()).hexdigest()[:16]


# ---- from uploads to runs ----


def shard_of(index: int, upload: Run) -> Shard:
    return Shard(
        index,
        upload.tests,
        upload.startup or 0.0,
        math.fsum(upload.file_costs.values()),
        math.fsum(s.seconds for s in upload.tests.values()),
    )


def runs_of(uploads: Iterable[Run]) -> list[RunView]:
    """The runs of a suite, oldest first: uploads sharing a run id are its shards."""
    by_id: dict[str, list[Run]] = {}
    alone: list[Run] = []
    for upload in sorted(uploads, key=lambda r: r.created_ns):
        if upload.run_id is None:
            alone.append(upload)
        else:
            by_id.setdefault(upload.run_id, []).append(upload)
    views: list[RunView] = []
    for run_id, shards in by_id.items():
        tests: dict[str, Sample] = {}
        for shard in shards:
            if tests.keys().isdisjoint(shard.tests):
                tests.update(shard.tests)  # the usual case: each test on one shard
            else:
                tests = dict(history.merge_runs(shards)[0].tests)
                break
        views.append(
            RunView(
                run_key(run_id, shards[0].created_ns),
                run_id,
                shards[0].created_ns,
                tuple(shard_of(i, u) for i, u in enumerate(shards)),
                tests,
                tuple(shards),
            )
        )
    for upload in alone:
        views.append(
            RunView(
                run_key(None, upload.created_ns),
                None,
                upload.created_ns,
                (shard_of(0, upload),),
                upload.tests,
                (upload,),
            )
        )
    return sorted(views, key=lambda v: (v.created_ns, v.key))


def shards_for(runs: Sequence[RunView], target: float) -> int | None:
    """What `slipstream plan --target` says from the recent runs: the fewest shards whose
    predicted slowest shard meets target; None if no number does."""
    recent = runs[-history.DEFAULT_LAST_RUNS :]
    uploads = [u for r in recent for u in r.uploads]
    tests = sorted({t for run in recent for t in run.tests})
    if not tests:
        return None
    estimates = history.estimate(tests, uploads)
    return fewest_shards(
        estimates.tests, target, file_costs=estimates.file_costs, startup=estimates.startup
    ).chosen


def predicted_walls(run: RunView, earlier: Sequence[Run]) -> list[float | None]:
    """Each shard's wall as the history before the run predicted it (None without one)."""
    if not earlier:
        return [None for _ in run.shards]
    estimates = history.estimate(list(run.tests), earlier)
    if not estimates.from_history:
        return [None for _ in run.shards]
    return [
        estimates.startup + math.fsum(estimates.tests.get(t, 0.0) for t in shard.tests)
        for shard in run.shards
    ]


@dataclass(frozen=True, slots=True)
class TestStats:
    """A test's recent durations, figured once."""

    test: str
    runs: int  # how many recent runs timed it
    failures: int
    fastest: float
    median: float
    slowest: float

    @property
    def spread(self) -> float:
        return self.slowest - self.fastest

    @property
    def flaky(self) -> bool:
        return 0 < self.failures < self.runs


def test_stats(runs: Sequence[RunView], recent: int = RECENT_RUNS) -> dict[str, TestStats]:
    """Each test's figures over the recent runs."""
    seconds: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    for run in runs[-recent:]:
        for test, sample in run.tests.items():
            got = seconds.get(test)
            if got is None:
                seconds[test] = [sample.seconds]
            else:
                got.append(sample.seconds)
            if sample.failed:
                failures[test] = failures.get(test, 0) + 1
    stats = {}
    for test, secs in seconds.items():
        secs.sort()
        stats[test] = TestStats(
            test, len(secs), failures.get(test, 0), secs[0], statistics.median(secs), secs[-1]
        )
    return stats


# ---- HTML ----


def esc(value: object) -> str:
    """Text made safe in HTML content and in quoted attributes."""
    return html.escape(str(value), quote=True)


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds >= 10:
        return f"{seconds:.0f}s"
    return f"{seconds:.2f}s"


def when(created_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(created_ns / 1e9)) + " UTC"


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6em 1.2em}header a{color:#fff;margin-right:1.2em}
main{padding:1em 1.2em;max-width:1200px}section{background:#fff;border:1px solid #dde1e6;
border-radius:6px;padding:.8em 1em;margin-bottom:1em}h1{font-size:1.3em}
h2{font-size:1.1em;margin:.2em 0 .6em}
table{border-collapse:collapse;width:100%}td,th{padding:.25em .6em;border-bottom:1px solid #eef0f3;
text-align:left;vertical-align:top}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
code{word-break:break-all}.ok{color:#17803d}.late{color:#b42318}.muted{color:#667085}
svg text{font:11px system-ui,sans-serif;fill:#344054}.target{stroke:#b42318;stroke-dasharray:4 3}
.bar{fill:#3b82f6}.bar.late{fill:#ef4444}.pred{stroke:#111827;stroke-width:2}.startup{fill:#f59e0b}
.files{fill:#a78bfa}svg{max-width:760px;display:block}
.kpi{display:inline-block;margin-right:2em}.kpi b{font-size:1.4em;display:block}
h3{font-size:1em;margin:.8em 0 .4em}svg.spark{display:inline-block}.spark .base{stroke:#dde1e6}
.worker{background:#fef3c7;padding:.3em .6em;border-radius:4px}
"""


def page(title: str, body: str, links: Links | None = None) -> str:
    """A whole HTML document; body is HTML already escaped."""
    nav = ""
    if links is not None:
        others = "".join(f'<a href="{esc(href)}">{esc(label)}</a>' for label, href in links.nav)
        nav = f'<header><a href="{esc(links.overview())}">Slipstream</a>{others}</header>'
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        '<link rel=icon href="data:,">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{nav}<main>{body}</main></body></html>\n"
    )


def _walls_chart(suite: str, runs: Sequence[RunView], target: float, links: Links) -> str:
    """The test stage's wall per run as bars, with the target as a line."""
    width, height, pad = 720, 180, 36
    shown = runs[-RECENT_RUNS:]
    top = max([target * 1.1, *(r.wall * 1.05 for r in shown)])
    step = (width - pad) / max(1, len(shown))
    bar = max(2.0, step * 0.7)

    def y(seconds: float) -> float:
        return height - 20 - (height - 30) * seconds / top

    parts = [
        f'<svg class="walls" role="img" viewBox="0 0 {width} {height}" width="100%" '
        f'aria-label="{esc(f"test stage wall per run of {suite}")}">'
    ]
    for i, run in enumerate(shown):
        x = pad + i * step
        late = " late" if run.wall > target else ""
        label = f"{when(run.created_ns)}: {duration(run.wall)} over {len(run.shards)} shard(s)"
        parts.append(
            f'<a href="{esc(links.run(suite, run.key))}"><rect class="bar run-bar{late}" '
            f'data-wall="{run.wall:.3f}" x="{x:.1f}" y="{y(run.wall):.1f}" width="{bar:.1f}" '
            f'height="{height - 20 - y(run.wall):.1f}"><title>{esc(label)}</title></rect></a>'
        )
    ty = y(target)
    parts.append(
        f'<line class="target" x1="{pad}" x2="{width}" y1="{ty:.1f}" y2="{ty:.1f}"/>'
        f'<text x="2" y="{ty + 4:.1f}">{esc(duration(target))}</text>'
        f'<text x="{pad}" y="{height - 4}">older</text>'
        f'<text x="{width - 40}" y="{height - 4}">newest</text></svg>'
    )
    return "".join(parts)


def suite_overview(
    suite: str,
    uploads: Sequence[Run],
    targets: Targets,
    links: Links,
    runs: Sequence[RunView] | None = None,
) -> str:
    """One suite's section of the overview: walls against the target, and the plan's N."""
    runs = runs_of(uploads) if runs is None else runs
    if not runs:
        return (
            f'<section class=suite><h2>{esc(suite)}</h2><p class="muted">no runs yet</p></section>'
        )
    latest = runs[-1]
    met = sum(1 for r in runs[-RECENT_RUNS:] if r.wall <= targets.test)
    shown = min(len(runs), RECENT_RUNS)
    n = shards_for(runs, targets.test)
    plan = (
        f"<b>{n}</b>shards meet {esc(duration(targets.test))} (slipstream plan)"
        if n is not None
        else "<b>&ndash;</b>no number of shards meets the target"
    )
    state = "ok" if latest.wall <= targets.test else "late"
    rows = "".join(
        f'<tr><td><a href="{esc(links.run(suite, r.key))}">{esc(when(r.created_ns))}</a></td>'
        f"<td><code>{esc(r.run_id or '(no run id)')}</code></td>"
        f'<td class="n">{len(r.shards)}</td><td class="n">{len(r.tests)}</td>'
        f'<td class="n {"ok" if r.wall <= targets.test else "late"}">{esc(duration(r.wall))}</td>'
        f'<td class="n">{r.balance:.2f}</td></tr>'
        for r in reversed(runs[-10:])
    )
    return (
        f'<section class=suite data-suite="{esc(suite)}"><h2>Suite <code>{esc(suite)}</code> '
        f'<a href="{esc(links.tests(suite))}">tests</a></h2>'
        f'<div class="kpi">Latest test stage<b class="{state}">'
        f"{esc(duration(latest.wall))}</b></div>"
        f'<div class="kpi">Runs within {esc(duration(targets.test))}<b>{met} of {shown}</b></div>'
        f'<div class="kpi">{plan}</div>'
        f"{_walls_chart(suite, runs, targets.test, links)}"
        '<table class=runs><tr><th>run</th><th>id</th><th class="n">shards</th>'
        '<th class="n">tests</th><th class="n">wall</th><th class="n">balance</th></tr>'
        f"{rows}</table></section>"
    )


def targets_html(targets: Targets) -> str:
    return (
        '<section class=targets><h2>Targets</h2><table><tr><th>stage</th><th class="n">'
        f'within</th></tr><tr><td>build</td><td class="n">{esc(duration(targets.build))}</td>'
        f'</tr><tr><td>test</td><td class="n">{esc(duration(targets.test))}</td></tr>'
        f'<tr><td>total</td><td class="n">{esc(duration(targets.total))}</td></tr></table>'
        "</section>"
    )


def overview_page(
    suites: Mapping[str, Sequence[Run]],
    targets: Targets,
    links: Links,
    *,
    extra: str = "",
) -> str:
    """The overview: the targets, then each suite's recent runs against them.
    extra: more sections (HTML, escaped), e.g. the server's cache figures."""
    sections = "".join(suite_overview(s, uploads, targets, links) for s, uploads in suites.items())
    if not suites:
        sections = '<section><p class="muted">no timing history yet</p></section>'
    return page(
        "Slipstream overview",
        f"<h1>Overview</h1>{targets_html(targets)}{sections}{extra}",
        links,
    )


def run_section(
    suite: str, runs: Sequence[RunView], key: str, links: Links, *, predict: bool = True
) -> str | None:
    """A run's section: its shards as a timeline (with the walls the history before it
    predicted, unless not predict), balance, slowest tests; None if no run has that key."""
    index = next((i for i, r in enumerate(runs) if r.key == key), None)
    if index is None:
        return None
    run = runs[index]
    earlier = [
        u for r in runs[max(0, index - history.DEFAULT_LAST_RUNS) : index] for u in r.uploads
    ]
    predicted = predicted_walls(run, earlier) if predict else [None for _ in run.shards]
    width, row, pad = 720, 26, 70
    top = max([s.wall for s in run.shards] + [p or 0.0 for p in predicted] + [1e-9]) * 1.05
    scale = (width - pad - 10) / top
    bars = [
        f'<svg class="timeline" role="img" viewBox="0 0 {width} {row * len(run.shards) + 24}" '
        'width="100%" aria-label="shards">'
    ]
    for i, shard in enumerate(run.shards):
        y = 4 + i * row
        x = float(pad)
        bars.append(f'<text x="2" y="{y + 15}">shard {shard.index}</text>')
        for cls, seconds in (
            ("startup", shard.startup),
            ("files", shard.file_seconds),
            ("bar", shard.test_seconds),
        ):
            if seconds > 0:
                bars.append(
                    f'<rect class="{cls}" x="{x:.1f}" y="{y}" width="{seconds * scale:.1f}" '
                    f'height="{row - 8}"><title>{cls}: {esc(duration(seconds))}</title></rect>'
                )
                x += seconds * scale
        expect = predicted[i]
        title = f"shard {shard.index}: {duration(shard.wall)}" + (
            f", predicted {duration(expect)}" if expect is not None else ""
        )
        bars.append(
            f'<rect class="shard-bar" data-shard="{shard.index}" data-wall="{shard.wall:.3f}" '
            f'x="{pad}" y="{y}" width="{shard.wall * scale:.1f}" height="{row - 8}" '
            f'fill="none" stroke="#1d2330"><title>{esc(title)}</title></rect>'
        )
        if expect is not None:
            px = pad + expect * scale
            bars.append(
                f'<line class="pred" x1="{px:.1f}" x2="{px:.1f}" y1="{y - 2}" y2="{y + row - 6}"/>'
            )
    bars.append(
        f'<text x="{pad}" y="{row * len(run.shards) + 18}">0</text>'
        f'<text x="{width - 60}" y="{row * len(run.shards) + 18}">{esc(duration(top))}</text></svg>'
    )
    shard_rows = "".join(
        f'<tr class=shard><td>{s.index}</td><td class="n">{len(s.tests)}</td>'
        f'<td class="n">{esc(duration(s.startup))}</td>'
        f'<td class="n">{esc(duration(s.file_seconds))}</td>'
        f'<td class="n">{esc(duration(s.test_seconds))}</td>'
        f'<td class="n wall">{esc(duration(s.wall))}</td>'
        f'<td class="n">{esc(duration(p)) if p is not None else "&ndash;"}</td></tr>'
        for s, p in zip(run.shards, predicted, strict=True)
    )
    slowest = sorted(run.tests.items(), key=lambda kv: -kv[1].seconds)[:TOP]
    test_rows = "".join(
        f'<tr><td><a href="{esc(links.test(suite, t))}"><code>{esc(t)}</code></a></td>'
        f'<td class="n">{esc(duration(s.seconds))}</td><td>{"failed" if s.failed else ""}</td></tr>'
        for t, s in slowest
    )
    anchor = links.run(suite, run.key)
    ident = f' id="{esc(anchor[1:])}"' if anchor.startswith("#") else ""
    return (
        f'<section class=run{ident} data-suite="{esc(suite)}">'
        f"<h2>Run <code>{esc(run.run_id or '(no run id)')}</code> of "
        f"<code>{esc(suite)}</code>, {esc(when(run.created_ns))}</h2>"
        f'<div class="kpi">Wall (slowest shard)<b>{esc(duration(run.wall))}</b></div>'
        f'<div class="kpi">Balance (slowest / mean)<b>{run.balance:.2f}</b></div>'
        f'<div class="kpi">Shards<b>{len(run.shards)}</b></div>'
        f'<div class="kpi">Tests<b>{len(run.tests)}</b></div>'
        f"<h3>Shards</h3>{''.join(bars)}"
        '<p class="muted">orange: start-up and collection, violet: file set-up, blue: tests; '
        "black tick: predicted wall</p>"
        '<table class=shards><tr><th>shard</th><th class="n">tests</th><th class="n">start-up</th>'
        '<th class="n">files</th><th class="n">tests</th><th class="n">wall</th>'
        f'<th class="n">predicted</th></tr>{shard_rows}</table>'
        f"<h3>Slowest tests</h3><table class=slowest>{test_rows}</table></section>"
    )


def run_of(runs: Sequence[RunView], key: str) -> RunView | None:
    return next((r for r in runs if r.key == key), None)


@dataclass(frozen=True, slots=True)
class Pulled:
    """One batch a runner of a queue-mode run pulled and finished."""

    runner: str
    batch: str  # the lease's name: batch.attempt
    tests: int
    seconds: float


def queue_section(pulled: Sequence[Pulled]) -> str:
    """The batches each runner of a queue-mode run pulled, in the order of the queue."""
    by_runner: dict[str, list[Pulled]] = {}
    for one in sorted(pulled, key=lambda p: (p.runner, p.batch)):
        by_runner.setdefault(one.runner, []).append(one)
    rows = "".join(
        f'<tr class=runner><td><code>{esc(runner)}</code></td><td class="n">{len(batches)}</td>'
        f'<td class="n">{sum(b.tests for b in batches)}</td>'
        f'<td class="n">{esc(duration(math.fsum(b.seconds for b in batches)))}</td>'
        f"<td>{esc(', '.join(b.batch for b in batches))}</td></tr>"
        for runner, batches in by_runner.items()
    )
    return (
        "<section class=queue><h2>Queue mode: the batches each runner pulled</h2>"
        '<table><tr><th>runner</th><th class="n">batches</th><th class="n">tests</th>'
        f'<th class="n">test time</th><th>batches (batch.attempt)</th></tr>{rows}</table>'
        "</section>"
    )


def run_page(
    suite: str,
    uploads: Sequence[Run],
    key: str,
    links: Links,
    *,
    pulled: Callable[[RunView], Sequence[Pulled]] | None = None,
) -> str | None:
    """The page of one run (with, for a queue-mode run, what pulled(run) says its runners
    pulled); None if the suite has no run of that key."""
    runs = runs_of(uploads)
    section = run_section(suite, runs, key, links)
    run = run_of(runs, key)
    if section is None or run is None:
        return None
    batches = pulled(run) if pulled is not None else []
    return page(f"Run of {suite}", section + (queue_section(batches) if batches else ""), links)


def _test_table(
    cls: str, title: str, rows: Sequence[tuple[str, str]], suite: str, links: Links
) -> str:
    body = "".join(
        f'<tr><td><a href="{esc(links.test(suite, t))}"><code>{esc(t)}</code></a></td>'
        f'<td class="n">{esc(v)}</td></tr>'
        for t, v in rows
    )
    if not rows:
        body = '<tr><td class="muted">none</td></tr>'
    return f'<div class="{cls}"><h3>{esc(title)}</h3><table>{body}</table></div>'


def tests_section(
    suite: str,
    runs: Sequence[RunView],
    links: Links,
    *,
    query: str = "",
    test: str | None = None,
) -> str:
    """A suite's tests: slowest, most variable, flaky, new and vanished; a search by id;
    one test's duration history."""
    stats = test_stats(runs)
    ranked = sorted(stats.values(), key=lambda s: (-s.median, s.test))
    slowest = [(s.test, duration(s.median)) for s in ranked[:TOP]]
    variable = sorted((s for s in stats.values() if s.runs > 1), key=lambda s: (-s.spread, s.test))
    spread = [
        (s.test, f"{duration(s.fastest)} to {duration(s.slowest)}")
        for s in variable[:TOP]
        if s.spread > 0
    ]
    flaky = [
        (s.test, f"failed {s.failures} of {s.runs}")
        for s in sorted(stats.values(), key=lambda s: s.test)
        if s.flaky
    ][:TOP]
    new: list[tuple[str, str]] = []
    vanished: list[tuple[str, str]] = []
    if len(runs) >= 2:
        latest, before = runs[-1], runs[-2]
        new = [
            (t, "new in the latest run") for t in sorted(latest.tests.keys() - before.tests.keys())
        ][:TOP]
        vanished = [
            (t, "not in the latest run") for t in sorted(before.tests.keys() - latest.tests.keys())
        ][:TOP]
    search = ""
    if links.search is not None:
        found = ""
        if query:
            hits = sorted(t for t in stats if query.lower() in t.lower())[:TOP]
            found = _test_table(
                "found",
                f"{len(hits)} test(s) matching {query!r}",
                [(t, duration(stats[t].median)) for t in hits],
                suite,
                links,
            )
        search = (
            f'<form class=search method=get action="{esc(links.search(suite))}">'
            f'<input type=search name=q value="{esc(query)}" placeholder="test id contains" '
            'aria-label="search tests"> <button type=submit>Search</button></form>' + found
        )
    one = ""
    if test is not None:
        one = _test_history(test, runs)
    anchor = links.tests(suite)
    ident = f' id="{esc(anchor[1:])}"' if anchor.startswith("#") else ""
    return (
        f'<section class=tests{ident} data-suite="{esc(suite)}">'
        f"<h2>Tests of <code>{esc(suite)}</code> "
        f'<span class="muted">({len(stats)} in the last '
        f"{min(len(runs), RECENT_RUNS)} runs)</span></h2>"
        f"{search}{one}"
        + _test_table("flaky", "Flaky (failed and passed across recent runs)", flaky, suite, links)
        + _test_table("slowest", "Slowest (median)", slowest, suite, links)
        + _test_table("variable", "Most variable (range of recent durations)", spread, suite, links)
        + _test_table("new", "New", new, suite, links)
        + _test_table("vanished", "Vanished", vanished, suite, links)
        + "</section>"
    )


def _test_history(test: str, runs: Sequence[RunView]) -> str:
    points = [(r, r.tests[test]) for r in runs[-RECENT_RUNS:] if test in r.tests]
    if not points:
        return (
            f"<div class=history><h3><code>{esc(test)}</code></h3>"
            '<p class="muted">no recent runs timed it</p></div>'
        )
    width, height, pad = 720, 140, 36
    top = max(s.seconds for _, s in points) * 1.1 or 1.0
    step = (width - pad) / len(points)
    parts = [f'<svg class="test-history" role="img" viewBox="0 0 {width} {height}" width="100%">']
    for i, (run, sample) in enumerate(points):
        h = (height - 30) * sample.seconds / top
        cls = "bar late" if sample.failed else "bar"
        label = f"{when(run.created_ns)}: {duration(sample.seconds)}" + (
            " (failed)" if sample.failed else ""
        )
        parts.append(
            f'<rect class="{cls}" x="{pad + i * step:.1f}" y="{height - 20 - h:.1f}" '
            f'width="{max(2.0, step * 0.7):.1f}" height="{h:.1f}">'
            f"<title>{esc(label)}</title></rect>"
        )
    parts.append(f'<text x="2" y="12">{esc(duration(top))}</text></svg>')
    return f"<div class=history><h3>History of <code>{esc(test)}</code></h3>{''.join(parts)}</div>"


def tests_page(
    suite: str, uploads: Sequence[Run], links: Links, *, query: str = "", test: str | None = None
) -> str:
    return page(
        f"Tests of {suite}",
        tests_section(suite, runs_of(uploads), links, query=query, test=test),
        links,
    )


def report(suites: Mapping[str, Sequence[Run]], targets: Targets) -> str:
    """One self-contained HTML file: the overview, each suite's latest run and its tests."""
    links = report_links()
    sections: list[str] = [f'<div id="overview"><h1>Slipstream report</h1>{targets_html(targets)}']
    details: list[str] = []
    for suite, uploads in suites.items():
        runs = runs_of(uploads)
        sections.append(suite_overview(suite, uploads, targets, links, runs))
        for run in runs[-REPORT_RUNS:]:
            # The prediction costs a history estimate: the newest run's is the one read.
            newest = run is runs[-1]
            details.append(run_section(suite, runs, run.key, links, predict=newest) or "")
        if runs:
            details.append(tests_section(suite, runs, links))
    if not suites:
        sections.append('<section><p class="muted">no timing history</p></section>')
    sections.append("</div>")
    return page("Slipstream report", "".join(sections + list(reversed(details))), links)
