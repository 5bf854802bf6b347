"""The pages without a browser: escaping (a property), the report command's inputs and
errors, and the /ui/ routes' answers over a real socket."""

from __future__ import annotations

import html.parser
import http.client
import pathlib
import ssl
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.cache_server.services.http_ui import UI_COOKIE
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.usage import SAVED_NAMESPACE, SAVED_PREFIX
from slipstream.client.split_client import RunSpec, SplitClient
from slipstream.history_store import load_history
from slipstream.split_cli import parse_duration
from slipstream.splitter import dashboard
from slipstream.splitter.history import Run, Sample
from tests.http.helpers import HttpClient, http_server, sha256
from tests.ops.helpers import make_pki, write_token_file
from tests.support.server_process import (
    ServerProcess,
    free_port,
    http_url,
    output_line,
    running,
    serve_exit,
)
from tests.ui import history_fixture as fx

# Every element a page may hold: anything else (a <script>, an <img>) came from data.
PAGE_TAGS = {
    "html", "head", "meta", "link", "title", "style", "body", "header", "main", "section",
    "div", "h1", "h2", "h3", "p", "a", "b", "span", "code", "table", "tr", "th", "td",
    "svg", "rect", "line", "text", "form", "input", "button", "label",
}  # fmt: skip


# Text from JUnit files and clients: markup's characters often, anything else too.
UNTRUSTED = st.one_of(
    st.text(alphabet=st.sampled_from("<>&\"'/= scriptimgonerrora"), min_size=1, max_size=30),
    st.sampled_from(["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "&amp;"]),
    st.text(min_size=1, max_size=30),
)


class Parsed(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.hrefs += [v or "" for k, v in attrs if k in ("href", "action")]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Parsed:
    parsed = Parsed()
    parsed.feed(page)
    parsed.close()
    return parsed


@settings(max_examples=60, deadline=None)
@given(UNTRUSTED, UNTRUSTED)
def test_whatever_a_test_id_or_run_id_holds_it_is_shown_as_text(test: str, run_id: str) -> None:
    uploads = [
        Run(run_id, 1_000, {test: Sample(1.0, False), "t::ok": Sample(2.0, False)}),
        Run(run_id, 2_000, {"t::other": Sample(0.5, True)}),
        Run("next", 3_000, {test: Sample(1.5, True)}),
    ]
    links = dashboard.server_links()
    runs = dashboard.runs_of(uploads)
    pages = [
        dashboard.report({"s": uploads}, dashboard.Targets()),
        dashboard.overview_page({"s": uploads}, dashboard.Targets(), links),
        dashboard.run_page("s", uploads, runs[0].key, links) or "",
        dashboard.tests_page("s", uploads, links, query=test, test=test),
    ]
    for page in pages:
        parsed = parse(page)
        assert parsed.tags <= PAGE_TAGS
        for href in parsed.hrefs:
            assert href == "data:," or href.startswith(("/ui/", "#")), href
    shown = "".join(parse(pages[3]).text)
    assert test in shown  # as text, not markup
    assert run_id in "".join(parse(pages[2]).text)


def test_a_run_is_its_uploads_sharing_a_run_id_and_its_wall_the_slowest_shard() -> None:
    uploads = [
        Run("r1", 1, {"a": Sample(3.0, False)}, startup=1.0),
        Run("r1", 2, {"b": Sample(10.0, False)}, file_costs={"f": 2.0}),
        Run(None, 3, {"a": Sample(4.0, False)}),
    ]
    runs = dashboard.runs_of(uploads)
    assert [len(r.shards) for r in runs] == [2, 1]
    assert [s.wall for s in runs[0].shards] == [4.0, 12.0]
    assert runs[0].wall == 12.0
    assert runs[0].balance == pytest.approx(12.0 / 8.0)


def test_flaky_means_failed_and_passed_in_recent_runs() -> None:
    uploads = [
        Run(f"r{i}", i, {"flaky": Sample(1.0, i % 2 == 0), "broken": Sample(1.0, True)})
        for i in range(4)
    ]
    stats = dashboard.test_stats(dashboard.runs_of(uploads))
    assert stats["flaky"].flaky and not stats["broken"].flaky


def report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slipstream.cli", "report", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_report_from_junit_files_takes_them_as_the_shards_of_one_run(
    tmp_path: pathlib.Path,
) -> None:
    for shard, seconds in enumerate((3.0, 7.5)):
        (tmp_path / f"shard{shard}.xml").write_text(
            f'<testsuite><testcase classname="tests.test_{shard}" name="test_a" '
            f'file="tests/test_{shard}.py" time="{seconds}"/></testsuite>'
        )
    out = tmp_path / "report.html"
    done = report("--html", str(out), "--junit", str(tmp_path / "shard*.xml"))
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert page.count('class="shard-bar"') == 2
    assert 'data-wall="7.500"' in page and 'data-wall="3.000"' in page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--junit", "no-such-*.xml"], "no-such-"),
        (["--test-target", "soon"], "is not a duration"),
        (["--storage-dir", "{tmp}/file"], "is not a directory"),
        (["--suite", "bad/name"], "suite name"),
    ],
)
def test_report_refuses_bad_input_with_one_line(
    tmp_path: pathlib.Path, args: list[str], message: str
) -> None:
    (tmp_path / "file").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = report("--html", str(tmp_path / "out.html"), *args)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr
    assert not (tmp_path / "out.html").exists()


def test_report_cannot_write_says_so(tmp_path: pathlib.Path) -> None:
    done = report("--html", str(tmp_path / "missing" / "out.html"), "--storage-dir", str(tmp_path))
    assert done.returncode == 2 and "--html" in done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    storage = tmp_path_factory.mktemp("ui") / "store"
    fx.write_history(storage)
    server: ServerProcess
    with running(http_server(storage, ["--ui-targets", "9m,2m,44m"])) as server:
        yield http_url(server)


def test_the_overview_measures_runs_against_the_servers_targets(ui: str) -> None:
    with HttpClient(ui) as http:
        page = http.get("/ui/").text
    targets = "".join(parse(page.split("<section class=targets>")[1].split("</section>")[0]).text)
    assert "9m00s" in targets and "2m00s" in targets and "44m00s" in targets
    # The fixture's runs take 2m18s (their slow shard): none is within 2m.
    assert f"Runs within 2m00s<b>0 of {fx.RUNS}</b>" in page


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/ui", 200),
        ("/ui/", 200),
        ("/ui/cache", 200),
        (f"/ui/s/{fx.SUITE}/tests", 200),
        (f"/ui/s/{fx.SUITE}/tests?test={urllib.parse.quote(fx.HOSTILE)}", 200),
        (f"/ui/s/{fx.SUITE}/run/0123456789abcdef", 404),
        ("/ui/s/nosuch/tests", 404),
        ("/ui/s/..%2F..%2Fetc/tests", 400),
        ("/ui/s/a/b/c/d/e", 404),
        ("/ui/nothing", 404),
    ],
)
def test_ui_routes_answer_html_with_a_no_script_policy(ui: str, path: str, status: int) -> None:
    with HttpClient(ui) as http:
        reply = http.get(path)
    assert reply.status == status, reply.text
    assert reply.headers["Content-Type"].startswith("text/html")
    assert "script-src" not in reply.headers["Content-Security-Policy"]
    assert reply.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "<script" not in reply.text


def test_ui_login_with_a_huge_form_is_refused_unread(ui: str) -> None:
    with HttpClient(ui) as http:
        reply = http.request(
            "POST",
            "/ui/login",
            b"token=" + b"x" * 10_000,
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert reply.status == 413
    assert "Set-Cookie" not in reply.headers


def test_ui_pages_are_read_only(ui: str) -> None:
    with HttpClient(ui) as http:
        reply = http.put("/ui/", b"x")
    assert reply.status == 405


def test_under_tls_the_cookie_is_secure_and_kept_only_for_a_read_token(
    tmp_path: pathlib.Path,
) -> None:
    pki = make_pki(tmp_path / "pki")
    tokens = write_token_file(tmp_path / "tokens.toml", [fx.READER, fx.WRITER])
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    server = ServerProcess(
        tmp_path / "store",
        ["--http-listen", "127.0.0.1:0", "--token-file", str(tokens), *args],
        credentials=pki.channel_credentials(),
    )
    with running(server):
        url = urllib.parse.urlsplit(http_url(server))
        assert url.scheme == "https" and url.port is not None

        def login(token: str) -> http.client.HTTPResponse:
            context = ssl.create_default_context(cafile=str(pki.ca))
            conn = http.client.HTTPSConnection("127.0.0.1", url.port, context=context, timeout=10)
            body = urllib.parse.urlencode({"token": token})
            conn.request(
                "POST",
                "/ui/login",
                body=body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            reply = conn.getresponse()
            reply.read()
            conn.close()
            return reply

        refused = login(fx.WRITER.value)
        assert refused.status == 403 and refused.getheader("Set-Cookie") is None
        unknown = login("not-a-token")
        assert unknown.status == 401 and unknown.getheader("Set-Cookie") is None
        kept = login(fx.READER.value)
        assert kept.status == 303 and kept.getheader("Location") == "/ui/"
        cookie = kept.getheader("Set-Cookie") or ""
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "secure", "samesite", "path"} <= attributes
        assert "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert fx.READER.value not in "".join(server.output)


def test_a_queue_mode_run_shows_the_batches_each_runner_pulled(tmp_path: pathlib.Path) -> None:
    storage = tmp_path / "store"
    fx.write_history(storage)
    newest = fx.RUNS - 1
    tests = sorted(t for shard in range(fx.SHARDS) for t in fx.shard_tests(newest, shard))
    runner = "runner-<b>2</b>"  # runner names come from clients too
    with running(http_server(storage)) as server, SplitClient(server.address) as client:
        client.join_queue(RunSpec(fx.SUITE, fx.run_id(newest), 0, 2, tests))
        pulled: dict[str, int] = {}
        for turn in range(100):
            name = ("runner-1", runner)[turn % 2]
            lease = client.lease(fx.SUITE, fx.run_id(newest), name, lease_seconds=30.0)
            if lease.finished:
                break
            assert lease.lease_id, "a lease is always free: every taken one was completed"
            results = {t: Sample(1.0, False) for t in lease.tests}
            client.complete(fx.SUITE, fx.run_id(newest), lease.lease_id, name, results)
            pulled[name] = pulled.get(name, 0) + 1
        key = dashboard.run_key(fx.run_id(newest), 0)
        with HttpClient(http_url(server)) as http:
            page = http.get(f"/ui/s/{fx.SUITE}/run/{key}").text
            older = http.get(f"/ui/s/{fx.SUITE}/run/{dashboard.run_key(fx.run_id(0), 0)}").text
    assert set(pulled) == {"runner-1", runner}
    queue = page.split("<section class=queue>")[1].split("</section>")[0]
    rows = {
        cells[0]: cells[1:]
        for row in queue.split("<tr class=runner>")[1:]
        for cells in [parse(row).text]
    }
    assert rows["runner-1"][0] == str(pulled["runner-1"])
    assert rows[runner][0] == str(pulled[runner])  # the name shown as text
    assert sum(int(r[1]) for r in rows.values()) == len(tests)
    assert "<section class=queue>" not in older  # a run that did not use the queue


def test_a_login_posted_from_another_sites_page_is_refused(ui: str) -> None:
    with HttpClient(ui) as http:
        reply = http.request(
            "POST",
            "/ui/login",
            b"token=anything",
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": "https://evil.example",
            },
        )
    assert reply.status == 403 and "another site" in reply.text
    assert "Set-Cookie" not in reply.headers


@pytest.mark.parametrize("target", ["20m", "75s", "50s", "30s"])
def test_the_overviews_shard_count_is_what_slipstream_plan_says(
    tmp_path: pathlib.Path, target: str
) -> None:
    storage = tmp_path / "store"
    fx.write_history(storage)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "slipstream.cli", "plan", "--target", target),
            *("--storage-dir", str(storage), "--suite", fx.SUITE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    chosen = [line.split()[0] for line in done.stdout.splitlines() if "<- fewest" in line]
    uploads, _ = load_history(storage, fx.SUITE)
    shown = dashboard.shards_for(dashboard.runs_of(uploads), parse_duration(target))
    assert shown == (int(chosen[0]) if chosen else None), done.stdout


def test_with_tokens_the_cookie_opens_the_pages_and_nothing_else(tmp_path: pathlib.Path) -> None:
    storage = tmp_path / "store"
    fx.write_history(storage)
    tokens = write_token_file(tmp_path / "tokens.toml", [fx.READER, fx.WRITER])
    server = http_server(storage, ["--token-file", str(tokens)])
    with running(server), HttpClient(http_url(server)) as http:

        def get(path: str, token: str | None) -> tuple[int, str]:
            cookie = {"Cookie": f"{UI_COOKIE}={token}"} if token else {}
            reply = http.request("GET", path, headers=cookie)
            return reply.status, reply.text

        status, page = get("/ui/", None)
        assert status == 401 and "<input type=password name=token" in page
        assert get("/ui/", fx.READER.value)[0] == 200
        status, page = get("/ui/", fx.WRITER.value)
        assert status == 403 and "needs scope &#x27;read&#x27;" in page
        assert fx.WRITER.value not in page
        assert get("/ui/", "unknown")[0] == 401
        assert get(CCACHE_PATH, fx.READER.value)[0] == 401  # the cookie is for the pages only
        with HttpClient(http_url(server), fx.READER.value) as reader:
            assert reader.get("/ui/cache").status == 200  # a header works too


CCACHE_PATH = "/ccache/3b/" + "c" * 31


@pytest.mark.parametrize("value", ["1m,2m", "10m,soon,45m", "10m,0s,45m"])
def test_serve_refuses_bad_ui_targets_with_one_line(tmp_path: pathlib.Path, value: str) -> None:
    done = serve_exit("--ui-targets", value, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--ui-targets" in done.stderr


def store_operations(http: HttpClient) -> dict[str, int]:
    """The cache page's table of calls made of the store."""
    page = http.get("/ui/cache").text
    table = page.split("<table class=operations>")[1].split("</table>")[0]
    return {
        cells[0]: int(cells[1].replace(",", ""))
        for row in table.split("<tr>")[1:]
        for cells in [parse(row).text]
    }


def test_a_page_view_of_an_unchanged_history_reads_no_record(tmp_path: pathlib.Path) -> None:
    """Nor one of an upload just received: the pages share the split service's cache."""
    storage = tmp_path / "store"
    fx.write_history(storage)
    with running(http_server(storage)) as server, HttpClient(http_url(server)) as http:
        assert http.get("/ui/").status == 200  # reads every upload once
        read = store_operations(http)["get_record"]
        for _ in range(3):
            assert http.get("/ui/").status == 200
            assert http.get(f"/ui/s/{fx.SUITE}/tests").status == 200
            assert http.get(f"/ui/s/{fx.SECOND_SUITE}/tests").status == 200
        assert store_operations(http)["get_record"] == read

        with SplitClient(server.address) as client:
            client.upload_timings(fx.SUITE, "ci-new", timings={"tests/t.py::t": Sample(1.0, False)})
        read = store_operations(http)["get_record"]
        page = http.get(f"/ui/s/{fx.SUITE}/tests?test=tests/t.py::t").text
        assert "no recent runs timed it" not in page  # the new upload is shown
        # Not read back: the split service kept it decoded, in the cache the pages share.
        assert store_operations(http)["get_record"] == read

        def plan_costs(run_key: str) -> dict[str, int]:
            before = store_operations(http)
            with SplitClient(server.address) as client:
                client.get_shard(RunSpec(fx.SUITE, run_key, 0, 2, ["tests/t.py::t", "t.py::u"]))
            after = store_operations(http)
            return {op: after[op] - before.get(op, 0) for op in ("get_record", "list_records")}

        # The history is kept, so a plan reads only its pin; the first plan since the
        # upload makes its estimates from one listing of the suite, as the next plan does.
        first, next_plan = plan_costs("plan-1"), plan_costs("plan-2")
        assert first["get_record"] == next_plan["get_record"] == 1
        assert first["list_records"] == next_plan["list_records"]


def ccache_lookups(http: HttpClient) -> tuple[list[str], str]:
    """The ccache row of the hit rates, and what the figures cover."""
    page = http.get("/ui/cache").text
    row = page.split('<tr data-kind="ccache">')[1].split("</tr>")[0]
    span = page.split('<span class="span">')[1].split("</span>")[0]
    return parse(row).text[:4], span


def test_the_days_hit_rates_outlive_a_restart(tmp_path: pathlib.Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # the same after the restart
    server = ServerProcess(tmp_path / "store", ["--http-listen", url.removeprefix("http://")])
    with running(server):
        with HttpClient(url) as http:
            assert http.put(CCACHE_PATH, b"object").status == 200
            assert http.get(CCACHE_PATH).status == 200
            assert http.get("/ccache/3b/" + "d" * 31).status == 404
            first, first_span = ccache_lookups(http)
        assert first == ["ccache", "1", "1", "50%"]
        server.restart()
        with HttpClient(url) as http:
            again, span = ccache_lookups(http)
            assert http.get(CCACHE_PATH).status == 200
            after, _ = ccache_lookups(http)
    assert again == first and span == first_span  # counted since the first start
    assert after == ["ccache", "2", "1", "67%"]


def test_an_unreadable_saved_record_is_removed_and_the_server_counts_anew(
    tmp_path: pathlib.Path,
) -> None:
    store = DiskStore(tmp_path / "store")
    store.put_record(SAVED_NAMESPACE, f"{SAVED_PREFIX}old", b'{"version": 2, "kinds": "garbage"')
    store.close()
    server = http_server(tmp_path / "store")
    with running(server), HttpClient(http_url(server)) as http:
        assert http.get("/ccache/3b/" + "d" * 31).status == 404
        row, span = ccache_lookups(http)
        assert row == ["ccache", "0", "1", "0%"]
        assert "when this server started counting" in span
        line = output_line(server, "pages' figures")
    assert "unreadable record" in line and "removed" in line
    store = DiskStore(tmp_path / "store")
    assert store.get_record(SAVED_NAMESPACE, f"{SAVED_PREFIX}old") is None


def test_hits_are_shown_per_instance_team_and_repository_with_the_rest_in_one_row(
    tmp_path: pathlib.Path,
) -> None:
    absent = "0" * 64
    server = http_server(tmp_path / "store")
    with running(server), HttpClient(http_url(server)) as http:
        assert http.put(f"/linux-x86/cas/{sha256(b'x')}", b"x").status == 200
        for _ in range(2):  # twice each: more lookups than the many instances below
            assert http.get(f"/linux-x86/ac/{absent}").status == 404  # a Bazel HTTP instance
            assert http.get(f"/linux-x86/cas/{sha256(b'x')}").status == 200
            assert http.get("/v8/artifacts/abc123?teamId=team_web").status == 404
            assert http.get(f"/v2/acme/app/blobs/sha256:{absent}").status == 404
        for n in range(23):
            assert http.get(f"/many-{n:02d}/ac/{absent}").status == 404
        page = http.get("/ui/cache").text
    section = page.split("<section class=instances>")[1].split("</table>")[0]
    rows = [parse(row.split(">", 1)[1]).text for row in section.split("<tr")[2:]]
    shown = {tuple(cells[:3]): cells[3:] for cells in rows}
    assert shown[("Bazel HTTP CAS", "instance", "linux-x86")] == ["2", "0", "100%"]
    assert shown[("Bazel HTTP action cache", "instance", "linux-x86")] == ["0", "2", "0%"]
    assert shown[("Turborepo", "team", "team_web")] == ["0", "2", "0%"]
    assert shown[("OCI blobs", "repository", "acme/app")] == ["0", "2", "0%"]
    # 27 names: the 20 with the most lookups (ties by name), then one row for the other 7
    assert len(rows) == 21 and rows[-1] == ["(all others)", "0", "7", "0%"]
    assert [cells[2] for cells in rows[4:-1]] == [f"many-{n:02d}" for n in range(16)]


def test_a_worker_of_several_says_its_figures_are_its_own(tmp_path: pathlib.Path) -> None:
    server = http_server(tmp_path / "store", ["--workers", "2"])
    with running(server), HttpClient(http_url(server)) as http:
        assert http.put(CCACHE_PATH, b"object").status == 200
        page = http.get("/ui/cache").text
    assert '<p class="worker">This page comes from one worker' in page
    # The workers' index is the supervisor's: a worker does not know the largest entries.
    largest = page.split("<section class=largest>")[1].split("</section>")[0]
    assert "not known to this server process" in largest
