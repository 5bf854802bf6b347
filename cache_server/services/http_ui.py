"""The web pages, under the reserved first path segment `ui`.

    GET  /ui/                         overview: targets, each suite's runs, cache figures
    GET  /ui/s/SUITE/run/KEY          one run: its shards as a timeline, slowest tests
    GET  /ui/s/SUITE/tests[?q=&test=] a suite's slow, variable, flaky, new, vanished tests
    GET  /ui/cache                    hit rates over the last day, hits per instance, top
                                      callers, largest entries, store, recent audit log
    POST /ui/login                    a token (form field `token`) becomes the UI's cookie

Server-rendered HTML (slipstream.splitter.dashboard) with inline SVG: no script,
nothing fetched from elsewhere (a Content-Security-Policy says so). Every page needs
`read`. When tokens are on, a browser without one gets a form asking for a token; the
login request is checked like any other (the pipeline reads its token from the form:
401 if unknown, 403 without `read`), and only then is the token kept as a cookie
(HttpOnly, SameSite=Strict, Secure under TLS) that the pipeline reads for `ui` paths.
No page shows a token.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from slipstream.cache_server.auth import READ
from slipstream.cache_server.services import ui_cache
from slipstream.cache_server.services.common import Backend, HttpError
from slipstream.cache_server.services.http_common import HttpFrontEnd, HttpOptions, Target
from slipstream.cache_server.storage.base import EntrySize
from slipstream.cache_server.usage import Usage, day_figures
from slipstream.splitter import dashboard, history
from slipstream.splitter.dashboard import esc
from slipstream.splitter.queue import QUEUE_NAMESPACE, Completion, QueuePlan

UI_PREFIX = "ui"
UI_COOKIE = "slipstream_ui"
LOGIN_ROUTE = "ui-login"
MAX_LOGIN_BODY = 4096
AUDIT_TAIL_BYTES = 64 * 1024
AUDIT_LINES = 50
LARGEST_SHOWN = 20
LARGEST_KEPT_SECONDS = 30.0  # the largest entries walk the store's whole index
_LINKS = dashboard.server_links(f"/{UI_PREFIX}")


def html_response(status: int, body: str) -> web.Response:
    response = web.Response(status=status, text=body, content_type="text/html")
    response.headers["Content-Security-Policy"] = dashboard.CSP
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"  # and Origin on a login post
    return response


def login_form(message: str) -> str:
    """The page asking for a token (message: why, escaped here)."""
    return dashboard.page(
        "Slipstream: token needed",
        f'<section class=login><h1>Slipstream</h1><p class="refused">{esc(message)}</p>'
        '<form method=post action="/ui/login"><label>Token with the <code>read</code> scope '
        "<input type=password name=token autocomplete=off required></label> "
        "<button type=submit>Open</button></form>"
        '<p class="muted">Kept by this browser as a cookie for these pages only.</p></section>',
    )


async def login_token(request: web.Request) -> str | None:
    """The token a POST to /ui/login carries in its form, None if none."""
    length = request.content_length
    if length is None or length > MAX_LOGIN_BODY:
        raise HttpError(413, f"the login form must be under {MAX_LOGIN_BODY} bytes", close=True)
    form = await request.post()
    token = form.get("token")
    if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token.strip()):
        return None
    return token.strip()


def check_same_origin(request: web.Request) -> None:
    """403 for a login posted by a page of another site (which could make a browser keep
    someone else's token): browsers send Origin with every POST."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    parsed = urllib.parse.urlsplit(origin)
    if parsed.netloc != request.host or parsed.scheme != request.scheme:
        raise HttpError(403, "a login from another site's page is refused")


class UiPages(HttpFrontEnd):
    prefix = UI_PREFIX
    scopes = {
        ("ui", "GET"): (READ,),
        (LOGIN_ROUTE, "POST"): (READ,),
    }
    ops: Any = None  # the server's cache_server.operations.Operations, for metrics and audit

    def __init__(self, backend: Backend, options: HttpOptions | None = None) -> None:
        super().__init__(backend, options)
        self.history = backend.history
        self._largest: tuple[float, list[EntrySize] | None] | None = None
        self._largest_lock = threading.Lock()

    async def credential(self, request: web.Request, target: Target) -> str | None:
        """The token a browser holds instead of a header: the one its login form posts
        (checked like any), else the pages' cookie."""
        if target.route == LOGIN_ROUTE:
            token = await login_token(request)
        else:
            token = request.cookies.get(UI_COOKIE)
        return None if not token else f"Bearer {token}"

    def see_operations(self, ops: Any) -> None:
        self.ops = ops

    def check_segments(self, segments: list[str], shown: str) -> list[str]:
        if segments in ([], [""]):
            return []  # /ui and /ui/
        return super().check_segments(segments, shown)

    def parse(self, segments: list[str], shown: str) -> Target:
        if segments == ["login"]:
            return Target(LOGIN_ROUTE, "", "")
        if not segments or segments == ["cache"]:
            return Target("ui", "", "/".join(segments))
        if len(segments) == 4 and segments[0] == "s" and segments[2] == "run":
            return Target("ui", segments[1], f"run/{segments[3]}")
        if len(segments) == 3 and segments[0] == "s" and segments[2] == "tests":
            return Target("ui", segments[1], "tests")
        raise HttpError(404, f"no page at {shown!r}: see /ui/")

    def refusal(
        self, request: web.Request, status: int, message: str, code: str | None
    ) -> web.Response:
        if status in (401, 403):
            response = html_response(status, login_form(message))
            if status == 401 and request.cookies.get(UI_COOKIE):
                response.del_cookie(UI_COOKIE, path="/ui")
            return response
        return html_response(
            status,
            dashboard.page("Slipstream", f"<section><p>{esc(message)}</p></section>", _LINKS),
        )

    async def serve(
        self, request: web.Request, target: Target, limits: Any
    ) -> tuple[web.StreamResponse, None]:
        if target.route == LOGIN_ROUTE:
            check_same_origin(request)
            token = await login_token(request)
            response = web.HTTPSeeOther("/ui/")
            if token is not None:
                response.set_cookie(
                    UI_COOKIE,
                    token,
                    path="/ui",
                    httponly=True,
                    samesite="Strict",
                    secure=request.secure,
                )
            return response, None
        query = request.rel_url.query
        if target.key == "":
            body = await self.backend.run(self._overview)
        elif target.key == "cache":
            body = await self.backend.run(self._cache)
        elif target.key == "tests":
            body = await self.backend.run(
                self._tests, target.instance, query.get("q", "")[:200], query.get("test")
            )
        else:
            body = await self.backend.run(self._run, target.instance, target.key[len("run/") :])
        return html_response(200, body), None

    # ---- pages (on a worker thread: they read the store) ----
    def _suites(self) -> list[str]:
        keys = self.store.list_records(history.NAMESPACE)
        return sorted(
            suite
            for suite in {info.key.partition("/")[0] for info in keys}
            if history.valid_suite(suite)
        )

    def _uploads(self, suite: str) -> list[history.Run]:
        try:
            runs, _ = self.history.load_runs(suite)
        except history.HistoryError:
            raise HttpError(404, f"no suite {suite!r}") from None
        if not runs:
            raise HttpError(404, f"no suite {suite!r}")
        return runs

    def _overview(self) -> str:
        suites = {s: self.history.load_runs(s)[0] for s in self._suites()}
        summary = self._cache_summary(self._usage())
        return dashboard.overview_page(suites, self._targets(), _LINKS, extra=summary)

    def _targets(self) -> dashboard.Targets:
        if self.ops is None:
            return dashboard.Targets()
        build, test, total = self.ops.config.ui_targets
        return dashboard.Targets(build, test, total)

    def _run(self, suite: str, key: str) -> str:
        page = dashboard.run_page(
            suite, self._uploads(suite), key, _LINKS, pulled=lambda run: self._pulled(suite, run)
        )
        if page is None:
            raise HttpError(404, f"no run {key!r} of suite {suite!r}")
        return page

    def _pulled(self, suite: str, run: dashboard.RunView) -> list[dashboard.Pulled]:
        """What the runners of run pulled from its queue, if it ran in queue mode (the
        queue whose run key is the run's id)."""
        if run.run_id is None:
            return []
        for info in self.store.list_records(QUEUE_NAMESPACE, f"{suite}/"):
            if not info.key.endswith("/queue"):
                continue
            data = self.store.get_record(QUEUE_NAMESPACE, info.key)
            try:
                plan = None if data is None else QueuePlan.from_bytes(data)
            except ValueError:
                continue
            if plan is None or plan.run_key != run.run_id:
                continue
            slug = info.key[: -len("/queue")]
            pulled = []
            for done in self.store.list_records(QUEUE_NAMESPACE, f"{slug}/done/"):
                raw = self.store.get_record(QUEUE_NAMESPACE, done.key)
                try:
                    completion = None if raw is None else Completion.from_bytes(raw)
                except ValueError:
                    continue
                if completion is not None:
                    seconds = math.fsum(s.seconds for s in completion.results.values())
                    pulled.append(
                        dashboard.Pulled(
                            completion.runner,
                            completion.lease,
                            len(completion.results),
                            seconds,
                        )
                    )
            return pulled
        return []

    def _tests(self, suite: str, query: str, test: str | None) -> str:
        return dashboard.tests_page(suite, self._uploads(suite), _LINKS, query=query, test=test)

    def _usage(self) -> Usage | None:
        """Every server process's figures, added up (this one's, others' saved)."""
        return None if self.ops is None else self.ops.usage_figures()  # type: ignore[no-any-return]

    def _bytes(self) -> tuple[float, float]:
        """Bytes served and taken in over gRPC and HTTP since the server started."""
        if self.ops is None:
            return 0.0, 0.0
        m = self.ops.metrics
        totals = []
        for counters in (
            (m.sent_bytes, m.http_sent_bytes),
            (m.received_bytes, m.http_received_bytes),
        ):
            totals.append(
                math.fsum(
                    sample.value
                    for counter in counters
                    for metric in counter.collect()
                    for sample in metric.samples
                    if sample.name.endswith("_total")
                )
            )
        return totals[0], totals[1]

    def _cache_summary(self, usage: Usage | None) -> str:
        if usage is None:
            return ""
        return ui_cache.day_section(
            day_figures(usage),
            self.store.stats(),
            *self._bytes(),
            one_worker=bool(getattr(self.ops, "shares_ports", False)),
        )

    def _largest_entries(self) -> tuple[float, list[EntrySize] | None]:
        """The store's largest entries, as of a moment at most LARGEST_KEPT_SECONDS ago
        (not known, None, is asked again: a disk store's index may have loaded since)."""
        with self._largest_lock:
            now = time.time()
            if (
                self._largest is None
                or self._largest[1] is None
                or now - self._largest[0] > LARGEST_KEPT_SECONDS
            ):
                self._largest = (now, self.store.largest_entries(LARGEST_SHOWN))
            return self._largest

    def _cache(self) -> str:
        operations = "".join(
            f'<tr><td>{esc(op)}</td><td class="n">{count:,}</td></tr>'
            for op, count in sorted(self.store.operation_counts().items())
        )
        usage = self._usage()
        per_name = (
            ""
            if usage is None
            else ui_cache.instances_section(usage) + ui_cache.callers_section(usage)
        )
        kept, largest = self._largest_entries()
        return dashboard.page(
            "Slipstream cache",
            f"<h1>Cache</h1>{self._cache_summary(usage)}{per_name}"
            f"{ui_cache.largest_section(largest, kept)}"
            "<section><h2>Store operations</h2>"
            f"<table class=operations>{operations}</table></section>"
            f"{self._audit()}",
            _LINKS,
        )

    def _audit(self) -> str:
        path = None if self.ops is None else self.ops.config.audit_log
        if not path or path == "-":
            return '<section><h2>Audit log</h2><p class="muted">no audit log file</p></section>'
        records = tail_records(path)
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{esc(record.get(k, ''))}</td>"
                for k in ("time", "event", "caller", "outcome", "protocol")
            )
            + f"<td><code>{esc(json.dumps(_rest(record), sort_keys=True))}</code></td></tr>"
            for record in reversed(records)
        )
        return (
            "<section class=audit><h2>Recent audit log</h2><table><tr><th>time</th><th>event</th>"
            f"<th>caller</th><th>outcome</th><th>protocol</th><th>details</th></tr>{rows}</table>"
            "</section>"
        )


def _rest(record: Mapping[str, Any]) -> dict[str, Any]:
    shown = {"time", "event", "caller", "outcome", "protocol"}
    return {k: v for k, v in record.items() if k not in shown}


def tail_records(path: str, lines: int = AUDIT_LINES) -> list[dict[str, Any]]:
    """The last JSON lines of the audit log (unreadable ones skipped)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - AUDIT_TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    records = []
    for line in data.splitlines()[-lines:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
