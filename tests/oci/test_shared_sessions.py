"""Upload sessions across the workers of `serve --workers 2`: every request of a session on
a connection of its own, so the kernel spreads them over the workers, until two workers
(told apart by the `pid` of their JSON log lines) have served the same session."""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Iterator

import pytest

from slipstream.cache_server.services.oci_sessions import MAX_SESSIONS_PER_CALLER
from tests.http.helpers import HttpClient, Reply, http_server, served_by
from tests.ops.helpers import Token, write_token_file
from tests.support.oci import sha256
from tests.support.server_process import ServerProcess, http_url, running

WRITER = Token("ci-main", "tok-shared-writer-1a2b", ("read", "cas-write", "ac-write"))
OTHER = Token("ci-other", "tok-shared-other-3c4d", ("read", "cas-write"))
MOST_TRIES = 40  # requests on fresh connections before two workers must have been reached


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("shared-sessions")
    tokens = write_token_file(root / "tokens.toml", [WRITER, OTHER])
    args = ["--workers", "2", "--token-file", str(tokens), "--log-level", "INFO"]
    with running(http_server(root / "store", [*args, "--log-format", "json"])) as proc:
        yield proc


def request(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes | None = b"",
    headers: dict[str, str] | None = None,
    token: Token = WRITER,
) -> Reply:
    """One request on a connection of its own."""
    with HttpClient(http_url(server), token=token.value) as http:
        return http.request(method, path, body, headers)


def error_code(reply: Reply) -> str:
    code: str = json.loads(reply.body)["errors"][0]["code"]
    return code


def open_session(server: ServerProcess, repository: str = "team/app") -> tuple[str, str]:
    reply = request(server, "POST", f"/v2/{repository}/blobs/uploads/")
    assert reply.status == 202, reply
    return reply.headers["Location"], reply.headers["Docker-Upload-UUID"]


def test_a_session_is_served_by_whichever_worker_a_request_reaches(server: ServerProcess) -> None:
    location, upload_id = open_session(server)
    piece = 300_000
    data = b""
    requests = 0  # on the session's path (the POST's is not)
    while len({pid for pid, _ in served_by(server, upload_id, requests)}) < 2:
        assert requests < MOST_TRIES, "every connection reached one worker"
        chunk = os.urandom(piece)
        headers = {"Content-Range": f"{len(data)}-{len(data) + piece - 1}"}
        reply = request(server, "PATCH", location, chunk, headers)
        data += chunk
        assert reply.status == 202 and reply.headers["Range"] == f"0-{len(data) - 1}", reply
        status = request(server, "GET", location)
        assert status.status == 204 and status.headers["Range"] == f"0-{len(data) - 1}", status
        requests += 2
    last = b"the last bytes, sent with the PUT"
    data += last
    reply = request(server, "PUT", f"{location}?digest=sha256:{sha256(data)}", last)
    assert reply.status == 201, reply
    assert request(server, "GET", location).status == 404  # the session is over, everywhere
    served = served_by(server, upload_id, requests + 2)
    assert {status for _, status in served} == {202, 204, 201, 404}
    for _ in range(6):
        got = request(server, "GET", f"/v2/team/app/blobs/sha256:{sha256(data)}", None)
        assert got.status == 200 and got.body == data
    assert request(server, "GET", f"/cas/{sha256(data)}", None).body == data
    # The server's directory of sessions is empty again.
    store = pathlib.Path(server.storage)
    assert list((store / "tmp" / "oci-sessions").iterdir()) == []


def test_a_chunk_out_of_order_is_refused_by_every_worker_and_loses_nothing(
    server: ServerProcess,
) -> None:
    location, upload_id = open_session(server)
    first = os.urandom(200_000)
    assert request(server, "PATCH", location, first, {"Content-Range": "0-199999"}).status == 202
    refusals = 0
    while (
        len({pid for pid, status in served_by(server, upload_id, 1 + refusals) if status == 416})
        < 2
    ):
        assert refusals < MOST_TRIES, "every connection reached one worker"
        reply = request(server, "PATCH", location, b"xx", {"Content-Range": "5-6"})
        assert reply.status == 416 and error_code(reply) == "BLOB_UPLOAD_INVALID", reply
        refusals += 1
    assert request(server, "GET", location).headers["Range"] == "0-199999"
    second = os.urandom(100_000)
    reply = request(server, "PATCH", location, second, {"Content-Range": "200000-299999"})
    assert reply.status == 202, reply
    data = first + second
    reply = request(server, "PUT", f"{location}?digest=sha256:{sha256(data)}", b"")
    assert reply.status == 201, reply
    assert request(server, "GET", f"/v2/team/app/blobs/sha256:{sha256(data)}", None).body == data


def test_a_session_of_another_caller_is_unknown_to_every_worker(server: ServerProcess) -> None:
    location, upload_id = open_session(server)
    tries = 0
    while len({pid for pid, status in served_by(server, upload_id, tries) if status == 404}) < 2:
        assert tries < MOST_TRIES, "every connection reached one worker"
        method = ("GET", "PATCH", "PUT", "DELETE")[tries % 4]
        reply = request(server, method, f"{location}?digest=sha256:{sha256(b'')}", token=OTHER)
        assert reply.status == 404 and error_code(reply) == "BLOB_UPLOAD_UNKNOWN", (method, reply)
        tries += 1
    other_repository = location.replace("/team/app/", "/team/other/")
    made_up = f"/v2/team/app/blobs/uploads/{'0' * 32}"
    for _ in range(4):
        for path in (other_repository, made_up):
            reply = request(server, "GET", path)
            assert reply.status == 404 and error_code(reply) == "BLOB_UPLOAD_UNKNOWN", reply
        assert request(server, "GET", location).status == 204  # still the owner's
    assert request(server, "DELETE", location).status == 204
    for _ in range(4):
        assert request(server, "GET", location).status == 404


def test_a_caller_with_too_many_sessions_loses_its_oldest_whichever_worker_opened_it(
    server: ServerProcess,
) -> None:
    locations = [open_session(server, "many")[0] for _ in range(MAX_SESSIONS_PER_CALLER + 1)]
    for _ in range(4):
        assert request(server, "GET", locations[0]).status == 404
    assert all(request(server, "GET", loc).status == 204 for loc in locations[1:])
    for loc in locations[1:]:
        assert request(server, "DELETE", loc).status == 204


def test_an_abandoned_session_is_cleaned_up_and_the_directory_goes_with_the_server(
    tmp_path: pathlib.Path,
) -> None:
    sessions = tmp_path / "store" / "tmp" / "oci-sessions"
    sessions.mkdir(parents=True)
    leftover = sessions / f"{'1' * 32}.{'2' * 32}.{'3' * 32}"  # a session of a server gone
    leftover.write_bytes(b"left over")
    args = ["--workers", "2", "--upload-idle-timeout", "1s"]
    with running(http_server(tmp_path / "store", args)) as server:
        assert not leftover.exists()
        with HttpClient(http_url(server)) as http:
            location = http.request("POST", "/v2/gone/app/blobs/uploads/", b"").headers["Location"]
            assert http.request("PATCH", location, b"x" * 200_000).status == 202
        [held] = list(sessions.iterdir())
        assert held.stat().st_size == 200_000
        deadline = time.monotonic() + 10
        while held.exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # no request comes: a worker's sweep ends it
        assert not held.exists()
        with HttpClient(http_url(server)) as http:
            reply = http.get(location)
            assert reply.status == 404 and error_code(reply) == "BLOB_UPLOAD_UNKNOWN"
            http.request("POST", "/v2/gone/app/blobs/uploads/", b"")  # open when it stops
    assert not sessions.exists()


def test_sessions_left_by_a_killed_workers_server_are_removed_by_a_single_process_start(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "store"
    with running(http_server(store, ["--workers", "2"])) as workers:
        open_session(workers)
        open_session(workers)
        sessions = store / "tmp" / "oci-sessions"
        assert len(list(sessions.iterdir())) == 2
        workers.kill()  # SIGKILL: no clean-up
    assert len(list(sessions.iterdir())) == 2
    with running(http_server(store)):
        assert not sessions.exists()
