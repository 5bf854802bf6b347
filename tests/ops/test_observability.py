"""Audit log, Prometheus metrics and structured logs of a real server after real traffic."""

from __future__ import annotations

import datetime
import json
import pathlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from slipstream.protos import layers_pb2, layers_pb2_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.ops.helpers import Token, channel_for, code_of, metrics_url, scrape
from tests.ops.helpers import write_token_file as _write_tokens
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, running

BUILDER = Token("builder", "tok-builder-c0ffee11", ("read", "cas-write"))
TRUSTED = Token("trusted", "tok-trusted-deadbeef22", ("read", "cas-write", "ac-write"))
RE = "build.bazel.remote.execution.v2"
EMPTY = digest(b"")


@dataclass
class Observed:
    server: ServerProcess
    audit: pathlib.Path
    metrics: str


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    root = tmp_path_factory.mktemp("observed")
    tokens = _write_tokens(root / "tokens.toml", [BUILDER, TRUSTED])
    audit = root / "audit.jsonl"
    args = [
        "--token-file",
        str(tokens),
        "--anonymous",
        "read",
        "--audit-log",
        str(audit),
        "--metrics-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--log-level",
        "INFO",
        "--max-size",
        "1M",
    ]
    with running(ServerProcess(root / "store", args)) as server:
        yield Observed(server, audit, metrics_url(server))


def _audit_lines(path: pathlib.Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _update(api: Reapi, action: re_pb2.Digest, instance: str = "") -> object:
    return api.ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(
            instance_name=instance, action_digest=action, action_result=re_pb2.ActionResult()
        )
    )


def test_audit_log_records_every_ac_and_layer_write(observed: Observed) -> None:
    start = datetime.datetime.now(datetime.UTC)
    before = len(_audit_lines(observed.audit)) if observed.audit.exists() else 0
    ok_action, denied_action, anon_action = (digest(b"a1"), digest(b"a2"), digest(b"a3"))
    with channel_for(observed.server, TRUSTED.value) as ch:
        _update(Reapi(ch), ok_action, instance="linux/x86")
        layers = layers_pb2_grpc.LayersStub(ch)
        layers.PutLayer(layers_pb2.PutLayerRequest(key="venv-abc", root_digest=EMPTY))
        code, _ = code_of(
            lambda: layers.PutLayer(layers_pb2.PutLayerRequest(key="venv-abc", root_digest=EMPTY))
        )
        assert code is grpc.StatusCode.ALREADY_EXISTS
        # Reads are not audited.
        Reapi(ch).ac.GetActionResult(
            re_pb2.GetActionResultRequest(instance_name="linux/x86", action_digest=ok_action)
        )
    with channel_for(observed.server, BUILDER.value) as ch:
        assert code_of(lambda: _update(Reapi(ch), denied_action))[0] is (
            grpc.StatusCode.PERMISSION_DENIED
        )
    with channel_for(observed.server) as ch:
        assert code_of(lambda: _update(Reapi(ch), anon_action))[0] is (
            grpc.StatusCode.PERMISSION_DENIED
        )

    deadline = time.monotonic() + 10
    # A call the handler refuses is answered (abort sends at once) just before it is logged.
    while len(lines := _audit_lines(observed.audit)[before:]) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(r["event"], r["caller"], r["outcome"]) for r in lines] == [
        ("ac_write", "trusted", "OK"),
        ("layer_write", "trusted", "OK"),
        ("layer_write", "trusted", "ALREADY_EXISTS"),
        ("ac_write", "builder", "PERMISSION_DENIED"),
        ("ac_write", "anonymous", "PERMISSION_DENIED"),
    ]
    ok, layer, again, denied, anon = lines
    assert ok["action_digest"] == f"{ok_action.hash}/{ok_action.size_bytes}"
    assert ok["instance"] == "linux/x86"
    assert ok["authenticated"] is True and anon["authenticated"] is False
    assert str(ok["peer"]).startswith("ipv4:127.0.0.1:")
    assert layer["key"] == "venv-abc" and layer["root_digest"] == f"{EMPTY.hash}/0"
    assert layer["overwrite"] is False and "already exists" in str(again["reason"])
    assert denied["action_digest"] == f"{denied_action.hash}/{denied_action.size_bytes}"
    assert denied["reason"] == (
        "UpdateActionResult needs scope 'ac-write', which caller 'builder' does not have"
    )
    for record in lines:
        when = datetime.datetime.fromisoformat(str(record["time"]))
        assert start - datetime.timedelta(seconds=5) <= when <= datetime.datetime.now(datetime.UTC)
        assert record["request_id"]
    text = observed.audit.read_text()
    for secret in (BUILDER.value, TRUSTED.value, "Bearer"):
        assert secret not in text


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_after_real_traffic(observed: Observed) -> None:
    before = scrape(observed.metrics)
    present, absent1, absent2 = b"present blob", b"absent 1", b"absent 2"
    big = [bytes([i]) * 400_000 for i in range(4)]  # 1.6 MB into a 1 MiB store: evictions
    action = digest(b"metrics action")
    with channel_for(observed.server, TRUSTED.value) as ch:
        api = Reapi(ch)
        api.upload(present)
        missing = api.missing(digest(present), digest(absent1), digest(absent2))
        assert len(missing) == 2
        read = re_pb2.BatchReadBlobsRequest(digests=[digest(present), digest(absent1)])
        codes = [r.status.code for r in api.cas.BatchReadBlobs(read).responses]
        assert codes == [0, grpc.StatusCode.NOT_FOUND.value[0]]
        assert api.read(digest(present)) == present
        assert code_of(lambda: api.read(digest(absent1)))[0] is grpc.StatusCode.NOT_FOUND
        code_of(lambda: api.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action)))
        _update(api, action)
        api.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
        for i, blob in enumerate(big):
            api.write(blob, upload_id=f"big-{i}")
    with channel_for(observed.server, BUILDER.value) as ch:
        code_of(lambda: _update(Reapi(ch), action))
    after = scrape(observed.metrics)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    cas = f"{RE}.ContentAddressableStorage"
    ac = f"{RE}.ActionCache"
    req = "slipstream_grpc_requests_total"
    assert delta(req, service=cas, method="FindMissingBlobs", code="OK") == 1
    assert delta(req, service=cas, method="BatchUpdateBlobs", code="OK") == 1
    assert delta(req, service=ac, method="GetActionResult", code="NOT_FOUND") == 1
    assert delta(req, service=ac, method="GetActionResult", code="OK") == 1
    assert delta(req, service=ac, method="UpdateActionResult", code="OK") == 1
    assert delta(req, service=ac, method="UpdateActionResult", code="PERMISSION_DENIED") == 1
    bs = "google.bytestream.ByteStream"
    assert delta(req, service=bs, method="Write", code="OK") == 4
    assert delta(req, service=bs, method="Read", code="NOT_FOUND") == 1
    # Bytes on the wire, both ways.
    received = delta("slipstream_grpc_received_bytes_total", service=bs, method="Write")
    assert received >= 1_600_000
    assert delta("slipstream_grpc_sent_bytes_total", service=bs, method="Read") >= len(present)
    # Latency histogram.
    hist = "slipstream_grpc_request_seconds"
    assert delta(f"{hist}_count", service=cas, method="FindMissingBlobs") == 1
    assert delta(f"{hist}_bucket", service=bs, method="Write", le="+Inf") == 4
    # Hits and misses, per service.
    lookups = "slipstream_cache_lookups_total"
    assert delta(lookups, service="cas", result="hit") == 1 + 1  # FindMissing, BatchRead
    assert delta(lookups, service="cas", result="miss") == 2 + 1
    assert delta(lookups, service="ac", result="hit") == 1
    assert delta(lookups, service="ac", result="miss") == 1
    assert delta(lookups, service="bytestream", result="hit") == 1
    assert delta(lookups, service="bytestream", result="miss") == 1
    # The store: size, bound and evictions.
    assert 400_000 <= _value(after, "slipstream_store_bytes") <= 1 << 20
    assert _value(after, "slipstream_store_max_bytes") == 1 << 20
    assert _value(after, "slipstream_store_blobs") >= 1
    assert delta("slipstream_store_evictions_total") >= 2
    assert _value(after, "slipstream_grpc_in_flight") == 0


def test_json_logs_carry_request_id_and_caller(observed: Observed) -> None:
    with channel_for(
        observed.server, TRUSTED.value, headers=[("x-request-id", "req-1234-abcd")]
    ) as ch:
        Reapi(ch).missing(digest(b"logged"))
    denied_headers = [("x-request-id", "req-denied")]
    with channel_for(observed.server, "wrong-token", headers=denied_headers) as ch:
        assert code_of(lambda: Reapi(ch).missing(digest(b"x")))[0] is (
            grpc.StatusCode.UNAUTHENTICATED
        )
    deadline = time.monotonic() + 10
    while True:  # the server's output arrives through a pipe, a moment after the reply
        # Every log line is JSON; the others are the start-up lines.
        records = [json.loads(line) for line in observed.server.output if line.startswith("{")]
        by_id = {r.get("request_id"): r for r in records}
        if {"req-1234-abcd", "req-denied"} <= set(by_id) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    ok = by_id["req-1234-abcd"]
    assert ok["caller"] == "trusted"
    assert ok["logger"] == "cache_server.access" and ok["level"] == "INFO"
    assert ok["method"] == f"/{RE}.ContentAddressableStorage/FindMissingBlobs"
    assert ok["grpc_code"] == "OK" and ok["duration_ms"] >= 0
    denied = by_id["req-denied"]
    assert denied["grpc_code"] == "UNAUTHENTICATED"
    assert denied["details"] == "the token is not known to this server"
    assert "caller" not in denied
    assert not any("wrong-token" in line for line in observed.server.output)
    # Every call has a request id, made up where the client sent none.
    assert all(r.get("request_id") for r in records if r["logger"] == "cache_server.access")


def test_process_and_garbage_collector_metrics(tmp_path: pathlib.Path) -> None:
    """The process's own figures are exported beside the cache's: memory, CPU, and
    the collections of each garbage-collector generation, which traffic makes run."""
    args = ["--metrics-listen", "127.0.0.1:0"]
    with running(ServerProcess("memory://", args)) as server:
        url = metrics_url(server)
        before = scrape(url)
        request = re_pb2.FindMissingBlobsRequest(
            blob_digests=[digest(i.to_bytes(4, "big")) for i in range(1000)]
        )
        with grpc.insecure_channel(server.address) as ch:
            for _ in range(20):
                assert len(Reapi(ch).cas.FindMissingBlobs(request).missing_blob_digests) == 1000
        after = scrape(url)
    assert after[("process_resident_memory_bytes", ())] > 10_000_000
    assert after[("process_cpu_seconds_total", ())] > 0
    young = ("python_gc_collections_total", (("generation", "0"),))
    assert after[young] > before[young]
    assert ("python_gc_collections_total", (("generation", "2"),)) in after
