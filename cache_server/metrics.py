"""Prometheus metrics, served over HTTP on their own port (--metrics-listen).

Calls are measured by a hook around every handler (cache_server.calls), the
store by a collector that asks it at scrape time:

    slipstream_grpc_requests_total{service,method,code}   calls, by final status
    slipstream_grpc_request_seconds{service,method}       latency histogram
    slipstream_grpc_received_bytes_total{service,method}  request bytes on the wire
    slipstream_grpc_sent_bytes_total{service,method}      response bytes on the wire
    slipstream_grpc_in_flight                              calls being served now
    slipstream_cache_lookups_total{service,result}        hit / miss, per blob or key:
        ac (GetActionResult), cas (FindMissingBlobs, BatchReadBlobs),
        bytestream (Read), layers (GetLayer); over HTTP (cache_server.http_endpoint):
        http_ac, http_cas, ccache, turborepo, nx, sccache, oci_blobs, oci_manifests (GET and HEAD);
        turborepo_events: the hits and misses turbo reports (POST /v8/artifacts/events)
    slipstream_http_requests_total{route,method,code}     HTTP cache requests, by status
    slipstream_http_request_seconds{route,method}         their latency
    slipstream_http_received_bytes_total{route,method}    request body bytes
    slipstream_http_sent_bytes_total{route,method}        response body bytes
    slipstream_store_bytes / _blobs / _max_bytes           from Store.stats(); _bytes and
        _blobs are left out while the disk store's index loads (they are not known yet)
    slipstream_store_index_loading                         1 while that index loads, else 0
    slipstream_store_evictions_total
    slipstream_store_operations_total{operation}          calls made of the store (CountingStore)
    slipstream_s3_requests_total{operation}               from Store.request_counts()
    process_* / python_gc_* / python_info                 prometheus_client's own: memory,
        CPU, open files, collections per garbage-collector generation
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slipstream.cache_server.auth import (
    AC_WRITE,
    CAS_WRITE,
    METHOD_SCOPES,
    READ,
    Caller,
)
from slipstream.cache_server.calls import Call, Hook
from slipstream.cache_server.resource_names import ResourceNameError, parse_read_name
from slipstream.cache_server.storage.base import Store, StoreStats
from slipstream.cache_server.usage import Usage

log = logging.getLogger("cache_server")

_RE = "/build.bazel.remote.execution.v2."
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@functools.lru_cache(maxsize=1024)
def _split(method: str) -> tuple[str, str]:
    """("build.bazel.remote.execution.v2.ActionCache", "GetActionResult") from a full method."""
    service, _, name = method.strip("/").rpartition("/")
    return service, name


def _lookups(call: Call) -> tuple[str, int, int] | None:
    """(service, hits, misses) of one finished call, where it is a lookup."""
    code = call.code
    method = call.method
    if method == f"{_RE}ActionCache/GetActionResult":
        return _single("ac", code)
    if method == "/google.bytestream.ByteStream/Read":
        return _single("bytestream", code)
    if method == "/slipstream.layers.v1.Layers/GetLayer":
        return _single("layers", code)
    if code is not grpc.StatusCode.OK or call.request is None or call.response is None:
        return None
    if method == f"{_RE}ContentAddressableStorage/FindMissingBlobs":
        missing = len(call.response.missing_blob_digests)
        return "cas", len(call.request.blob_digests) - missing, missing
    if method == f"{_RE}ContentAddressableStorage/BatchReadBlobs":
        return "cas", call.response.found, call.response.not_found  # an EncodedBatchRead
    return None


def _single(service: str, code: grpc.StatusCode) -> tuple[str, int, int] | None:
    if code is grpc.StatusCode.OK:
        return service, 1, 0
    if code is grpc.StatusCode.NOT_FOUND:
        return service, 0, 1
    return None


class StoreFigures(Protocol):
    """What StoreCollector reads: a Store, or the supervisor's accountant of its workers."""

    def stats(self) -> StoreStats | None: ...

    def operation_counts(self) -> dict[str, int]: ...

    def request_counts(self) -> dict[str, int]: ...


def _instance(call: Call) -> str:
    """The REAPI instance a lookup named ("" if none)."""
    request = call.request
    if request is None:
        return ""
    name = getattr(request, "instance_name", None)
    if isinstance(name, str):
        return name
    resource = getattr(request, "resource_name", None)  # ByteStream Read
    if isinstance(resource, str):
        try:
            return parse_read_name(resource).instance
        except ResourceNameError:
            return ""
    return ""


def access_of(method: str) -> str:
    """ "read", "write" or "other": what the scope a method needs says it does (an
    unlisted method, e.g. an HTTP request for no route, is "other")."""
    if method not in METHOD_SCOPES:
        return "other"
    scopes = METHOD_SCOPES[method]
    needed = (scopes,) if scopes is None or isinstance(scopes, str) else scopes
    if CAS_WRITE in needed or AC_WRITE in needed:
        return "write"
    return "read" if READ in needed else "other"


def caller_name(call: Call) -> str:
    """Whom a call counts for in the callers' table: a token's name, "(anonymous)", or
    "(no valid token)" for a call refused before it had a caller. Token names start with
    a letter or digit, so the parenthesised ones are never a token's."""
    caller = call.caller
    if not isinstance(caller, Caller):
        return NO_VALID_TOKEN
    return caller.name if caller.authenticated else ANONYMOUS_ROW


ANONYMOUS_ROW = "(anonymous)"
NO_VALID_TOKEN = "(no valid token)"
_REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# The pages' own routes (cache_server.services.http_ui): page views are not cache calls.
_PAGE_ROUTES = frozenset({"ui", "ui-login"})


class StoreCollector(Collector):
    """Store size, evictions and S3 request counts, read when Prometheus scrapes."""

    def __init__(self, store: StoreFigures) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.store.stats()
        except Exception:
            log.exception("store stats failed")
            stats = None
        if stats is not None:
            yield GaugeMetricFamily(
                "slipstream_store_index_loading",
                "1 while the store's index loads (its size and entries are not known yet)",
                value=int(stats.loading),
            )
            if not stats.loading:
                yield GaugeMetricFamily(
                    "slipstream_store_bytes",
                    "Bytes the store's entries take as --max-size counts them"
                    " (on disk: whole blocks and directory entries)",
                    value=stats.bytes_used,
                )
                yield GaugeMetricFamily(
                    "slipstream_store_blobs", "Entries held by the store", value=stats.blobs
                )
            if stats.max_bytes is not None:
                yield GaugeMetricFamily(
                    "slipstream_store_max_bytes", "Size bound of the store", value=stats.max_bytes
                )
            yield CounterMetricFamily(
                "slipstream_store_evictions",
                "Entries evicted to stay within the size bound",
                value=stats.evictions,
            )
        operations = self.store.operation_counts()
        if operations:
            calls = CounterMetricFamily(
                "slipstream_store_operations",
                "Calls made of the store, by operation",
                labels=["operation"],
            )
            for operation, count in sorted(operations.items()):
                calls.add_metric([operation], count)
            yield calls
        counts = self.store.request_counts()
        if not counts:
            return
        requests = CounterMetricFamily(
            "slipstream_s3_requests",
            "HTTP requests sent to S3, retries included",
            labels=["operation"],
        )
        for operation, count in sorted(counts.items()):
            requests.add_metric([operation], count)
        yield requests


class Metrics(Hook):
    """Counts calls, bytes, latency and cache hits; serves them over HTTP. Also keeps the
    pages' figures (usage: hits over the last day, per instance and per caller)."""

    def __init__(self, store: Store) -> None:
        self.usage = Usage()
        self.registry = CollectorRegistry()
        r = self.registry
        # The process itself: memory, CPU, open files, garbage collections.
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=r)
        self.requests = Counter(
            "slipstream_grpc_requests",
            "gRPC calls served",
            ["service", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "slipstream_grpc_request_seconds",
            "Time to serve a gRPC call",
            ["service", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.received_bytes = Counter(
            "slipstream_grpc_received_bytes",
            "Bytes of request messages",
            ["service", "method"],
            registry=r,
        )
        self.sent_bytes = Counter(
            "slipstream_grpc_sent_bytes",
            "Bytes of response messages",
            ["service", "method"],
            registry=r,
        )
        self.in_flight = Gauge(
            "slipstream_grpc_in_flight",
            "Calls being served",
            registry=r,
            multiprocess_mode="livesum",  # with --workers: the sum over the live workers
        )
        self.lookups = Counter(
            "slipstream_cache_lookups",
            "Cache lookups by result (per blob for batch calls)",
            ["service", "result"],
            registry=r,
        )
        self.http_requests = Counter(
            "slipstream_http_requests",
            "HTTP cache requests served",
            ["route", "method", "code"],
            registry=r,
        )
        self.http_latency = Histogram(
            "slipstream_http_request_seconds",
            "Time to serve an HTTP cache request",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_received_bytes = Counter(
            "slipstream_http_received_bytes",
            "Request body bytes of HTTP requests",
            ["route", "method"],
            registry=r,
        )
        self.http_sent_bytes = Counter(
            "slipstream_http_sent_bytes",
            "Response body bytes of HTTP requests",
            ["route", "method"],
            registry=r,
        )
        r.register(StoreCollector(store))
        self._http: WSGIServer | None = None
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _labels(self, metric: Any, *values: str) -> Any:
        """metric.labels(*values), looked up once: prometheus_client's labels() takes
        a lock and checks its arguments on every call, a few per cent of a small call."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # ---- hook ----
    def begin(self, call: Call) -> None:
        self.in_flight.inc()
        call.notes["metrics.in_flight"] = True

    def end(self, call: Call) -> None:
        if call.notes.pop("metrics.in_flight", False):
            self.in_flight.dec()
        if call.protocol == "http":
            found = self._http_request(call)
            instance = call.notes.get("http.instance", "")
        else:
            service, method = _split(call.method)
            self._labels(self.requests, service, method, call.code.name).inc()
            self._labels(self.latency, service, method).observe(time.monotonic() - call.started)
            found = _lookups(call)
            instance = "" if found is None else _instance(call)
        hits = misses = 0
        if found is not None:
            kind, hits, misses = found
            if hits:
                self._labels(self.lookups, kind, "hit").inc(hits)
            if misses:
                self._labels(self.lookups, kind, "miss").inc(misses)
            self.usage.lookups(kind, instance, hits, misses)
        if call.notes.get("http.route") not in _PAGE_ROUTES:
            refused = call.code in _REFUSED
            self.usage.call(caller_name(call), access_of(call.method), hits, misses, refused)

    def _http_request(self, call: Call) -> tuple[str, int, int] | None:
        """One HTTP request (route: ac, cas, ccache, ... or invalid); (kind, hits, misses)
        for lookups."""
        route, method = call.notes.get("http.route", "invalid"), call.method_name
        status, hit = call.notes.get("http.status", 0), call.notes.get("http.hit")
        self._labels(self.http_requests, route, method, str(status)).inc()
        self._labels(self.http_latency, route, method).observe(time.monotonic() - call.started)
        received, sent = call.notes.get("http.received", 0), call.notes.get("http.sent", 0)
        if received:
            self._labels(self.http_received_bytes, route, method).inc(received)
        if sent:
            self._labels(self.http_sent_bytes, route, method).inc(sent)
        if hit is None:
            return None
        kind = f"http_{route}" if route in ("ac", "cas") else route
        hits, misses = hit if isinstance(hit, tuple) else (int(hit), int(not hit))
        return kind, hits, misses

    def received(self, method: str, size: int) -> None:
        self._labels(self.received_bytes, *_split(method)).inc(size)

    def sent(self, method: str, size: int) -> None:
        self._labels(self.sent_bytes, *_split(method)).inc(size)

    # ---- HTTP ----
    def serve(self, listen: str) -> str:
        """Serve /metrics on HOST:PORT (port 0 picks one); returns the URL."""
        self._http, url = serve_registry(self.registry, listen)
        return url

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def serve_registry(registry: CollectorRegistry, listen: str) -> tuple[WSGIServer, str]:
    """Serve registry's /metrics on HOST:PORT (port 0 picks one) on a thread; returns the
    server (to shut down) and the URL."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    server, _ = start_http_server(int(port), host, registry=registry)
    shown = f"[{host}]" if ":" in host else host
    return server, f"http://{shown}:{server.server_port}/metrics"


def workers_registry(directory: str, store: StoreFigures) -> CollectorRegistry:
    """The metrics of `serve --workers N`, served by the supervisor: the workers' call
    metrics from prometheus_client's multiprocess files in directory (counters and
    histograms summed, calls in flight summed over live workers), and the store-wide
    figures of the accountant. Process metrics (memory, CPU) are the supervisor's own."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    ProcessCollector(registry=registry)
    registry.register(StoreCollector(store))
    return registry
