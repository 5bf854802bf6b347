"""The web pages and the HTML report in a real browser: Debian's chromium, headless,
driven by Playwright (which downloads no browser of its own here), against a real
server holding a recorded history and some cache traffic.

Screenshots of every page go to SLIPSTREAM_SCREENSHOTS (default: a folder in the
test's tmp dir; its path is printed), for CI to keep as artifacts.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import grpc
import pytest

from slipstream.cache_server.services.http_ui import UI_COOKIE
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.http.helpers import HttpClient, http_server
from tests.ops.helpers import channel_for, write_token_file
from tests.support.reapi import Reapi, digest, rpc_error
from tests.support.server_process import ServerProcess, http_url, running
from tests.ui import history_fixture as fx

CHROMIUM = os.environ.get("SLIPSTREAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
CCACHE_KEY = "/ccache/3b/" + "a" * 31


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/setup does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (it is in the dev extra)")
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    folder = pathlib.Path(
        os.environ.get("SLIPSTREAM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots")
    )
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of the pages: {folder}")
    return folder


class Visit:
    """A browser tab that records what went wrong: console errors, page errors,
    failed requests, error responses, dialogs (an alert would be a script that ran)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.problems: list[str] = []
        self.requests: list[str] = []
        page.on(
            "console",
            lambda m: self.problems.append(f"console: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url}"))
        page.on("request", lambda r: self.requests.append(r.url))
        page.on(
            "response",
            lambda r: (
                self.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None
            ),
        )
        page.on("dialog", self.on_dialog)

    def on_dialog(self, dialog: Any) -> None:
        self.problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    def open(self, url: str, shot: pathlib.Path | None = None) -> Any:
        response = self.page.goto(url)
        self.page.wait_for_load_state("load")
        if shot is not None:
            self.page.screenshot(path=str(shot), full_page=True)
        return response

    def clean(self) -> None:
        assert self.problems == []
        assert self.page.locator("script").count() == 0


def traffic(url: str, token: str | None = None) -> None:
    """A ccache write, a hit and a miss."""
    with HttpClient(url, token) as http:
        assert http.put(CCACHE_KEY, b"object file").status == 200
        assert http.get(CCACHE_KEY).status == 200
        assert http.get("/ccache/3b/" + "b" * 31).status == 404


@pytest.fixture
def ui_server(tmp_path: pathlib.Path) -> Iterator[tuple[ServerProcess, str]]:
    storage = tmp_path / "store"
    fx.write_history(storage)
    audit = tmp_path / "audit.jsonl"
    with running(http_server(storage, ["--audit-log", str(audit)])) as server:
        url = http_url(server)
        traffic(url)
        yield server, url


def test_every_page_reads_at_a_glance(
    browser: Any, ui_server: tuple[ServerProcess, str], screenshots: pathlib.Path
) -> None:
    _, url = ui_server
    visit = Visit(browser.new_page(viewport={"width": 1200, "height": 900}))

    visit.open(f"{url}/ui/", screenshots / "overview.png")
    visit.clean()
    page = visit.page
    targets = page.locator("section.targets").inner_text()
    assert "10m00s" in targets and "20m00s" in targets and "45m00s" in targets
    app = page.locator(f'section.suite[data-suite="{fx.SUITE}"]')
    assert app.locator("rect.run-bar").count() == fx.RUNS
    assert app.locator("table.runs tr").count() == fx.RUNS + 1
    assert "shards meet" in app.inner_text()
    assert page.locator(f'section.suite[data-suite="{fx.SECOND_SUITE}"] rect.run-bar').count() == 3
    own = page.locator(f'section.suite[data-suite="{fx.OWN_SUITE}"]')
    assert own.locator("rect.run-bar").count() == len(fx.OWN_RUNS)
    lookups = page.locator("table.lookups").inner_text()
    assert re.search(r"ccache\s+1\s+1\s+50%", lookups), lookups
    served = page.locator("section.cache b.served").inner_text()
    assert int(served.split()[0].replace(",", "")) >= len(b"object file")  # the ccache hit

    # The newest run, from its row in the overview.
    app.locator("table.runs tr").nth(1).locator("a").click()
    page.wait_for_load_state("load")
    page.screenshot(path=str(screenshots / "run.png"), full_page=True)
    visit.clean()
    bars = page.locator("rect.shard-bar")
    assert bars.count() == fx.SHARDS
    last = fx.RUNS - 1
    for shard in range(fx.SHARDS):
        wall = float(bars.nth(shard).get_attribute("data-wall"))
        assert wall == pytest.approx(fx.shard_wall(last, shard), abs=0.001)
    assert fx.run_id(last) in page.locator("h2").first.inner_text()

    visit.open(f"{url}/ui/s/{fx.SUITE}/tests", screenshots / "tests.png")
    visit.clean()
    flaky = page.locator("div.flaky").inner_text()
    assert fx.FLAKY in flaky
    assert page.locator("div.variable tr").first.inner_text().startswith(fx.VARIABLE)
    assert fx.HOSTILE in page.locator("div.slowest").inner_text()  # shown as text
    assert "tests/test_new.py::test_added_last" in page.locator("div.new").inner_text()
    assert "tests/test_old.py::test_removed_last" in page.locator("div.vanished").inner_text()

    page.fill("input[name=q]", "<script>")
    page.click("form.search button")
    page.wait_for_load_state("load")
    visit.clean()
    assert fx.HOSTILE in page.locator("div.found").inner_text()
    page.locator("div.found a").first.click()
    page.wait_for_load_state("load")
    page.screenshot(path=str(screenshots / "test-history.png"), full_page=True)
    visit.clean()
    assert fx.HOSTILE in page.locator("div.history h3").inner_text()
    assert page.locator("svg.test-history rect").count() == fx.RUNS

    visit.open(f"{url}/ui/cache", screenshots / "cache.png")
    visit.clean()
    audit = page.locator("section.audit").inner_text()
    assert "ccache_put" in audit
    # calls, reads, writes, hits, misses, refused: the ccache write, hit and miss
    callers = page.locator("section.callers tr").nth(1)
    assert cells(callers) == ["(anonymous)", "3", "2", "1", "1", "1", "0"]


@pytest.fixture
def locked_server(tmp_path: pathlib.Path) -> Iterator[tuple[ServerProcess, str]]:
    storage = tmp_path / "store"
    fx.write_history(storage)
    tokens = write_token_file(tmp_path / "tokens.toml", [fx.READER, fx.WRITER])
    with running(http_server(storage, ["--token-file", str(tokens)])) as server:
        yield server, http_url(server)


def test_with_tokens_a_browser_logs_in_once_with_a_read_token(
    browser: Any, locked_server: tuple[ServerProcess, str], screenshots: pathlib.Path
) -> None:
    _, url = locked_server
    context = browser.new_context()
    page = context.new_page()
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)

    response = page.goto(f"{url}/ui/s/{fx.SUITE}/tests")
    assert response.status == 401
    assert page.locator("form input[name=token]").count() == 1
    assert "needs a token" in page.locator("p.refused").inner_text()
    page.screenshot(path=str(screenshots / "login.png"), full_page=True)

    # A token without `read` is refused, and not kept.
    page.fill("input[name=token]", fx.WRITER.value)
    with page.expect_navigation() as refused:
        page.click("form button")
    assert refused.value.status == 403
    assert "read" in page.locator("p.refused").inner_text()
    assert context.cookies() == []

    page.fill("input[name=token]", fx.READER.value)
    with page.expect_navigation():
        page.click("form button")
    assert page.url == f"{url}/ui/"
    assert page.locator(f'section.suite[data-suite="{fx.SUITE}"] rect.run-bar').count() == fx.RUNS
    (cookie,) = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert not cookie["secure"]  # no TLS here
    assert fx.READER.value not in page.content()

    # Once per browser: other pages open with the cookie alone.
    assert page.goto(f"{url}/ui/s/{fx.SUITE}/tests").status == 200
    assert fx.FLAKY in page.locator("div.flaky").inner_text()
    # The cookie is for the pages only, not a way into the cache.
    assert page.goto(f"{url}{CCACHE_KEY}").status == 401
    assert dialogs == []
    context.close()


def test_the_report_file_opens_with_no_network_request(
    browser: Any, tmp_path: pathlib.Path, screenshots: pathlib.Path
) -> None:
    storage = tmp_path / "store"
    fx.write_history(storage)
    out = tmp_path / "report.html"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "slipstream.cli", "report"),
            *("--html", str(out), "--storage-dir", str(storage)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    visit = Visit(browser.new_page(viewport={"width": 1200, "height": 900}))
    visit.open(out.as_uri(), screenshots / "report.png")
    visit.clean()
    assert visit.requests == [out.as_uri()]
    page = visit.page
    assert page.locator(f'section.suite[data-suite="{fx.SUITE}"] rect.run-bar').count() == fx.RUNS
    newest = page.locator(f"section.run:has-text('{fx.run_id(fx.RUNS - 1)}')")
    assert newest.count() == 1
    assert newest.locator("rect.shard-bar").count() == fx.SHARDS
    tests = page.locator(f'section.tests[data-suite="{fx.SUITE}"]')
    assert fx.FLAKY in tests.locator("div.flaky").inner_text()
    assert fx.HOSTILE in page.locator("body").inner_text()
    # Links are anchors within the file: following one stays offline.
    page.locator(f'section.suite[data-suite="{fx.SUITE}"] table.runs a').first.click()
    assert visit.requests == [out.as_uri()]
    assert quote("#") not in page.url


HOSTILE_INSTANCE = "ci/<script>alert('instance')</script>"
BIG = b"B" * 300_000  # the largest entry
SECOND = b"s" * 150_000
SMALL = b"small blob"


def usage_traffic(server: ServerProcess, url: str) -> None:
    """The writer stores blobs over gRPC (one under a hostile instance name) and a ccache
    entry; the read-only reader reads, hits and misses over gRPC and HTTP, and is refused
    a write."""
    with channel_for(server, fx.WRITER.value) as channel:
        writer = Reapi(channel)
        writer.upload(SMALL, SECOND, instance=HOSTILE_INSTANCE)
        assert writer.write(BIG, instance=HOSTILE_INSTANCE).committed_size == len(BIG)
    with HttpClient(url, fx.WRITER.value) as http:
        assert http.put(CCACHE_KEY, b"object file").status == 200
    with channel_for(server, fx.READER.value) as channel:
        reader = Reapi(channel)
        assert reader.read(digest(BIG), instance=HOSTILE_INSTANCE) == BIG  # a hit
        absent = digest(b"never stored")
        assert rpc_error(lambda: reader.read(absent, instance=HOSTILE_INSTANCE)).code() == (
            grpc.StatusCode.NOT_FOUND
        )
        found = reader.cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(
                instance_name=HOSTILE_INSTANCE, blob_digests=[digest(SMALL), absent]
            )
        )
        assert list(found.missing_blob_digests) == [absent]  # a hit and a miss
        request = re_pb2.GetActionResultRequest(instance_name="linux", action_digest=absent)
        assert rpc_error(lambda: reader.ac.GetActionResult(request)).code() == (
            grpc.StatusCode.NOT_FOUND
        )
        refused = rpc_error(lambda: reader.upload(b"not allowed"))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    with HttpClient(url, fx.READER.value) as http:
        assert http.get(CCACHE_KEY).status == 200
        assert http.get("/ccache/3b/" + "b" * 31).status == 404


def cells(row: Any) -> list[str]:
    return [c.strip() for c in row.locator("td").all_inner_texts()]


def test_the_cache_page_shows_the_days_hit_rates_who_used_the_cache_and_the_largest_entries(
    browser: Any, locked_server: tuple[ServerProcess, str], screenshots: pathlib.Path
) -> None:
    server, url = locked_server
    usage_traffic(server, url)
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.add_cookies(
        [{"name": UI_COOKIE, "value": fx.READER.value, "domain": "127.0.0.1", "path": "/ui"}]
    )
    visit = Visit(context.new_page())
    page = visit.page

    # The hit rate per protocol: on the overview and the cache page alike.
    for path, shot in (("/ui/", None), ("/ui/cache", screenshots / "cache-usage.png")):
        assert visit.open(f"{url}{path}", shot).status == 200
        visit.clean()
        rates = {
            row.get_attribute("data-kind"): cells(row)
            for row in page.locator("table.lookups tr[data-kind]").all()
        }
        assert rates["bytestream"][:4] == ["REAPI ByteStream reads", "1", "1", "50%"]
        assert rates["cas"][1:4] == ["1", "1", "50%"]
        assert rates["ac"][1:4] == ["0", "1", "0%"]
        assert rates["ccache"][1:4] == ["1", "1", "50%"]
        for kind in rates:  # a bar for the bucket now, titled with its figures
            chart = page.locator(f'table.lookups tr[data-kind="{kind}"] svg.spark rect')
            assert chart.count() == 1
        span = page.locator("section.cache h3 .span").inner_text()
        assert "when this server started counting" in span  # a new server: less than a day

    instances = {
        (c[0], c[2]): c[3:]
        for row in page.locator("section.instances tr[data-kind]").all()
        for c in [cells(row)]
    }
    assert instances[("REAPI ByteStream reads", HOSTILE_INSTANCE)] == ["1", "1", "50%"]
    assert instances[("REAPI CAS (finds, batch reads)", HOSTILE_INSTANCE)] == ["1", "1", "50%"]
    assert instances[("REAPI action cache", "linux")] == ["0", "1", "0%"]
    assert instances[("ccache", "(none)")] == ["1", "1", "50%"]
    assert page.locator("script").count() == 0  # the instance name was text

    callers = {
        c[0]: c[1:] for row in page.locator("section.callers tr").all()[1:] for c in [cells(row)]
    }
    # calls, reads, writes, hits, misses, refused: the reader's 6 reads and refused write
    assert callers[fx.READER.name] == ["7", "6", "1", "3", "4", "1"]
    assert callers[fx.WRITER.name] == ["3", "0", "3", "0", "0", "0"]

    largest = page.locator("section.largest tr").all()[1:]
    assert [cells(row)[:2] for row in largest[:2]] == [
        ["cas", digest(BIG).hash],
        ["cas", digest(SECOND).hash],
    ]
    assert [row.locator("td").nth(2).get_attribute("data-size") for row in largest[:2]] == [
        str(len(BIG)),
        str(len(SECOND)),
    ]
    assert cells(largest[0])[2] == f"{len(BIG):,}"
    context.close()
