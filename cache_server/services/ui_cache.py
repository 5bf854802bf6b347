"""The cache's figures as HTML sections of the /ui/ pages (cache_server.services.http_ui):
the last day's hit rate per protocol with a chart, hits per instance / team /
repository, calls per caller, the largest entries. Every name is escaped: instance
names come from clients."""

from __future__ import annotations

import time
from collections.abc import Sequence

from slipstream.cache_server.storage.base import EntrySize, StoreStats
from slipstream.cache_server.usage import (
    CALLS,
    HITS,
    MISSES,
    READS,
    REFUSED,
    WRITES,
    Bucket,
    DayFigures,
    Usage,
)
from slipstream.splitter.dashboard import esc

TOP_NAMES = 20  # rows of the per-name tables before "(all others)"

# What each lookup kind (cache_server.metrics) is, as the pages name it.
KIND_LABELS = {
    "ac": "REAPI action cache",
    "cas": "REAPI CAS (finds, batch reads)",
    "bytestream": "REAPI ByteStream reads",
    "layers": "layers",
    "http_ac": "Bazel HTTP action cache",
    "http_cas": "Bazel HTTP CAS",
    "ccache": "ccache",
    "sccache": "sccache",
    "turborepo": "Turborepo",
    "turborepo_events": "Turborepo, as turbo reports",
    "nx": "Nx",
    "oci_blobs": "OCI blobs",
    "oci_manifests": "OCI manifests",
}
# What a kind's instance name is.
_NAME_KINDS = {
    "turborepo": "team",
    "turborepo_events": "team",
    "oci_blobs": "repository",
    "oci_manifests": "repository",
}
_SPARK_WIDTH, _SPARK_HEIGHT = 288, 24


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def rate(hits: int | float, misses: int | float) -> str:
    return f"{hits / (hits + misses):.0%}" if hits + misses else "-"


def spark(kind: str, buckets: Sequence[Bucket]) -> str:
    """The hit rate per bucket as bars (none where there were no lookups)."""
    step = _SPARK_WIDTH / max(1, len(buckets))
    parts = [
        f'<svg class="spark" role="img" viewBox="0 0 {_SPARK_WIDTH} {_SPARK_HEIGHT}" '
        f'width="{_SPARK_WIDTH}" height="{_SPARK_HEIGHT}" '
        f'aria-label="{esc(f"hit rate of {kind_label(kind)} over time")}">'
        f'<line class="base" x1="0" x2="{_SPARK_WIDTH}" y1="{_SPARK_HEIGHT - 0.5}" '
        f'y2="{_SPARK_HEIGHT - 0.5}"/>'
    ]
    for i, bucket in enumerate(buckets):
        total = bucket.hits + bucket.misses
        if not total:
            continue
        h = max(1.0, (_SPARK_HEIGHT - 2) * bucket.hits / total)
        label = (
            f"{utc(bucket.start)}: {bucket.hits:,} hits, {bucket.misses:,} misses "
            f"({rate(bucket.hits, bucket.misses)})"
        )
        parts.append(
            f'<rect class="bar" x="{i * step:.1f}" y="{_SPARK_HEIGHT - h:.1f}" '
            f'width="{max(1.0, step - 0.5):.1f}" height="{h:.1f}">'
            f"<title>{esc(label)}</title></rect>"
        )
    parts.append("</svg>")
    return "".join(parts)


WORKER_NOTE = (
    '<p class="worker">This page comes from one worker of <code>serve --workers N</code>: '
    "lookups, instances and callers add up every worker's (the others' as they saved them, "
    "at most 30 s ago); bytes moved are this worker's.</p>"
)


def day_section(
    figures: DayFigures,
    stats: StoreStats | None,
    served: float,
    taken: float,
    *,
    one_worker: bool = False,
) -> str:
    """The summary on the overview and the cache page: store size, bytes moved, and the
    hit rate per protocol over the last day (or since counting started, if later).
    one_worker: the server is one of several workers, whose figures these are."""
    rows = (
        "".join(
            f'<tr data-kind="{esc(kind)}"><td>{esc(kind_label(kind))}</td>'
            f'<td class="n">{hits:,}</td><td class="n">{misses:,}</td>'
            f'<td class="n">{rate(hits, misses)}</td>'
            f"<td>{spark(kind, figures.series[kind])}</td></tr>"
            for kind, (hits, misses) in figures.totals.items()
        )
        or '<tr><td class="muted" colspan=5>no lookups in this time</td></tr>'
    )
    if stats is None:
        store = ""
    elif stats.loading:  # its figures are not known yet
        store = (
            '<div class="kpi">Stored<b class=loading>index loading</b></div>'
            f'<div class="kpi">Evictions<b>{stats.evictions:,}</b></div>'
        )
    else:
        store = (
            f'<div class="kpi">Stored<b>{stats.bytes_used:,} bytes</b></div>'
            f'<div class="kpi">Entries<b>{stats.blobs:,}</b></div>'
            f'<div class="kpi">Evictions<b>{stats.evictions:,}</b></div>'
        )
    moved = (
        f'<div class="kpi">Served<b class=served>{served:,.0f} bytes</b></div>'
        f'<div class="kpi">Received<b>{taken:,.0f} bytes</b></div>'
    )
    span = (
        f"over the last day (since {utc(figures.start)})"
        if figures.whole_day
        else f"since {utc(figures.start)}, when this server started counting"
    )
    return (
        f'<section class=cache><h2><a href="/ui/cache">Cache</a></h2>'
        f"{WORKER_NOTE if one_worker else ''}{store}{moved}"
        '<p class="muted">bytes served and received since the server started</p>'
        f'<h3>Hit rate per protocol, <span class="span">{esc(span)}</span></h3>'
        '<table class=lookups><tr><th>protocol</th><th class="n">hits</th>'
        '<th class="n">misses</th><th class="n">hit rate</th><th>per 10 minutes</th></tr>'
        f"{rows}</table></section>"
    )


def _name_cell(name: str) -> str:
    return f"<td><code>{esc(name)}</code></td>" if name else '<td class="muted">(none)</td>'


def instances_section(usage: Usage) -> str:
    """Hits and misses per protocol and instance, team or repository."""
    top, rest = usage.instances.top(TOP_NAMES)
    rows = "".join(
        f'<tr data-kind="{esc(kind)}"><td>{esc(kind_label(kind))}</td>'
        f"<td>{_NAME_KINDS.get(kind, 'instance')}</td>{_name_cell(name)}"
        f'<td class="n">{hits:,}</td><td class="n">{misses:,}</td>'
        f'<td class="n">{rate(hits, misses)}</td></tr>'
        for (kind, name), (hits, misses) in top
    )
    if any(rest):
        rows += (
            '<tr class="other"><td class="muted" colspan=3>(all others)</td>'
            f'<td class="n">{rest[0]:,}</td><td class="n">{rest[1]:,}</td>'
            f'<td class="n">{rate(*rest)}</td></tr>'
        )
    rows = rows or '<tr><td class="muted" colspan=6>no lookups yet</td></tr>'
    return (
        "<section class=instances><h2>Hits per instance, team or repository</h2><table>"
        '<tr><th>protocol</th><th>kind</th><th>name</th><th class="n">hits</th>'
        f'<th class="n">misses</th><th class="n">hit rate</th></tr>{rows}</table>'
        f'<p class="muted">since {utc(usage.started)}, when the server started</p></section>'
    )


def callers_section(usage: Usage) -> str:
    """Cache calls per caller (token name), readers and writers alike."""
    top, rest = usage.callers.top(TOP_NAMES, key=lambda row: row[CALLS])

    def cells(row: list[int]) -> str:
        return "".join(
            f'<td class="n">{row[i]:,}</td>' for i in (CALLS, READS, WRITES, HITS, MISSES, REFUSED)
        )

    rows = "".join(
        f"<tr><td>{esc(name)}</td>{cells(row)}</tr>" for name, row in top
    )  # token names are the server's own, but escaped all the same
    if any(rest):
        rows += f'<tr class="other"><td class="muted">(all others)</td>{cells(rest)}</tr>'
    rows = rows or '<tr><td class="muted" colspan=7>no calls yet</td></tr>'
    return (
        "<section class=callers><h2>Top callers</h2><table><tr><th>caller (token name)</th>"
        '<th class="n">calls</th><th class="n">reads</th><th class="n">writes</th>'
        '<th class="n">hits</th><th class="n">misses</th><th class="n">refused</th></tr>'
        f"{rows}</table>"
        f'<p class="muted">cache calls since {utc(usage.started)}, when the server started '
        "(these pages' own views are not counted)</p></section>"
    )


def largest_section(entries: Sequence[EntrySize] | None, kept: float) -> str:
    """The largest entries of the store (entries None: the store does not know them)."""
    if entries is None:
        body = (
            '<p class="muted">not known to this server process: S3 lists no sizes cheaply, '
            "with <code>serve --workers N</code> the supervisor keeps the index, and a disk "
            "store's index may still be loading</p>"
        )
    elif not entries:
        body = '<p class="muted">the store is empty</p>'
    else:
        rows = "".join(
            f"<tr><td>{esc(e.namespace)}</td><td><code>{esc(e.name)}</code></td>"
            f'<td class="n" data-size="{e.size}">{e.size:,}</td></tr>'
            for e in entries
        )
        body = (
            '<table><tr><th>kind</th><th>name</th><th class="n">bytes</th></tr>'
            f'{rows}</table><p class="muted">as of {utc(kept)}</p>'
        )
    return f"<section class=largest><h2>Largest entries</h2>{body}</section>"
