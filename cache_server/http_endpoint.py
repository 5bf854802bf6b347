"""The HTTP endpoint (`slipstream serve --http-listen HOST:PORT`): every HTTP protocol.

Served from the same event loop, store and worker threads as the gRPC services,
so an entry written over one protocol is read over the other. Each protocol is a
front end (cache_server.services.http_*): it owns the paths under a reserved first
segment (`ccache`), or, for Bazel's HTTP cache, every path no other one reserves.

Every request goes through the pipeline the gRPC calls go through
(cache_server.calls): the same hooks, one instance of each, so one caller's calls
in flight count against one limit whatever the protocol. Around a front end, the
pipeline identifies the caller (`Authorization: Bearer TOKEN`, or HTTP Basic with
the token as the password), checks the scopes the route needs (401 without a
token, 403 without the scope), counts the request against the caller's limits
(429), times and counts it in the metrics, audits a write taken on trust (refused
ones too), logs it with a request id, and maps any error to a status with a
one-line text body (cache_server.services.common.http_status_of): never a
traceback. Request lines and headers never reach a log (they may hold tokens).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import ssl
import tempfile
from collections.abc import Sequence

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from slipstream.cache_server.auth import OPEN, Caller, register_method
from slipstream.cache_server.calls import CURRENT, REQUEST_ID_HEADER, Call, CallRun, request_id
from slipstream.cache_server.config import TlsConfig
from slipstream.cache_server.operations import Operations
from slipstream.cache_server.services.common import Backend, HttpError, RpcError, http_status_of
from slipstream.cache_server.services.http_bazel import BazelHttpCache
from slipstream.cache_server.services.http_ccache import CcacheStorage
from slipstream.cache_server.services.http_common import (
    HttpFrontEnd,
    HttpOptions,
    Lookups,
    Target,
    text,
)
from slipstream.cache_server.services.http_nx import NxCache
from slipstream.cache_server.services.http_oci import OciRegistry
from slipstream.cache_server.services.http_sccache import SccacheWebdav
from slipstream.cache_server.services.http_turborepo import TurborepoCache
from slipstream.cache_server.services.http_ui import UiPages

log = logging.getLogger("cache_server")

FRONT_ENDS: tuple[type[HttpFrontEnd], ...] = (
    UiPages,
    CcacheStorage,
    TurborepoCache,
    NxCache,
    SccacheWebdav,
    OciRegistry,
    BazelHttpCache,
)

# What a refused or failed HTTP request counts as in the hooks (access log, audit).
_GRPC_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    416: grpc.StatusCode.OUT_OF_RANGE,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,  # an upstream registry is
    503: grpc.StatusCode.UNAVAILABLE,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def http_method(route: str, verb: str) -> str:
    """The method name an HTTP request has in the pipeline: "/http.ccache/PUT"."""
    return f"/http.{route}/{verb}"


class _NoRequestText(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending line, which may be an
    Authorization header: keep the fact and its kind, drop the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.args:
            kind = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
            what = str(record.msg).split("%", 1)[0].strip() or "error"
            record.msg = f"aiohttp: {what} ({kind or 'details'} withheld: may hold a token)"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


for _name in ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal"):
    logging.getLogger(_name).addFilter(_NoRequestText())


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server SSL context from PEM bytes (the ssl module loads only files)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="slipstream-tls-") as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert, tls.cert), (key, tls.key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert, key)
    if tls.client_ca is not None:
        ctx.load_verify_locations(cadata=tls.client_ca.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _authorization(header: str | None) -> str | None:
    """The authorization header as auth reads it; HTTP Basic's password is the token."""
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return header
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise HttpError(401, "the Basic authorization header does not decode") from None
    return f"Bearer {decoded.partition(':')[2]}"


class HttpEndpoint:
    """The aiohttp application, its front ends and its listening site."""

    def __init__(
        self,
        backend: Backend,
        ops: Operations,
        front_ends: Sequence[type[HttpFrontEnd]] = FRONT_ENDS,
        options: HttpOptions | None = None,
    ) -> None:
        self.backend = backend
        self.ops = ops
        built = [front_end(backend, options) for front_end in front_ends]
        self.front_ends = built
        self.by_prefix = {fe.prefix: fe for fe in built if fe.prefix is not None}
        self.default = next((fe for fe in built if fe.prefix is None), None)
        for fe in built:
            fe.see_operations(ops)
            for (route, verb), scopes in fe.scopes.items():
                register_method(http_method(route, verb), scopes)
        self.app = web.Application(handler_args={"max_field_size": 16384})
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, listen: str, *, reuse_port: bool = False) -> int:
        """Listen on HOST:PORT (port 0 picks one); returns the port. With reuse_port, the
        port is shared with the other workers of the server (SO_REUSEPORT)."""
        host, _, port = listen.rpartition(":")
        tls = self.ops.config.tls
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(
            self.runner,
            host.strip("[]"),
            int(port),
            ssl_context=ssl_context(tls) if tls is not None else None,
            shutdown_timeout=5.0,
            reuse_port=reuse_port or None,
        )
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            raise OSError(f"cannot serve HTTP on {listen}: {exc.strerror or exc}") from None
        self.port = int(self.runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        for front_end in self.front_ends:
            await front_end.close()

    def front_end_of(self, request: web.Request) -> tuple[HttpFrontEnd, list[str], str]:
        """The front end a request's path goes to, the path's segments it parses (after
        its prefix, if any), and the path as shown in messages; HttpError 400 or 404."""
        path = request.raw_path.split("?", 1)[0]
        if not path.startswith("/"):
            raise HttpError(400, "the path must start with /")
        segments = path[1:].split("/")
        shown = path[:120]
        front_end = self.by_prefix.get(segments[0])
        if front_end is not None:
            return front_end, segments[1:], shown
        if self.default is not None:
            return self.default, segments, shown
        raise HttpError(404, f"nothing is served at {shown!r}")

    def route(
        self, request: web.Request, front_end: HttpFrontEnd, segments: list[str], shown: str
    ) -> Target:
        """The target a request names; HttpError 400 or 405 if none."""
        checked = front_end.check_segments(segments, shown)
        target = front_end.parse_request(checked, shown, request.rel_url.query)
        if (target.route, request.method) not in front_end.scopes:
            allowed = front_end.methods(target.route)
            raise _MethodNotAllowed(request.method, target.route, allowed)
        return target

    # ---- one request, through the pipeline ----
    async def handle(self, request: web.Request) -> web.StreamResponse:
        verb = request.method
        headers: tuple[tuple[str, str | bytes], ...] = ()
        rid = request.headers.get(REQUEST_ID_HEADER)
        call = Call(
            http_method("invalid", verb),
            None,
            request_id(((REQUEST_ID_HEADER, rid),) if rid else ()),
            headers,
            protocol="http",
            remote=request.remote or "",
        )
        CURRENT.set(call)
        run = CallRun(self.ops.hooks, call)
        call.notes["http.route"] = "invalid"
        hit: Lookups = None
        response: web.StreamResponse
        failure: BaseException | None = None
        front_end: HttpFrontEnd | None = None
        try:
            front_end, segments, shown = self.front_end_of(request)
            target = self.route(request, front_end, segments, shown)
            call.method = http_method(target.route, verb)
            call.label = f"{verb} on {target.route}"
            call.notes["http.route"] = target.route
            call.notes["http.instance"] = target.instance  # an instance, team or repository
            call.notes["http.path"] = request.path[:200]  # checked: no spaces, no percent-encoding
            audit = front_end.audit(verb, target)
            if audit is not None:
                call.notes["audit"] = audit
            authorization = _authorization(request.headers.get("Authorization"))
            if authorization is None:
                authorization = await front_end.credential(request, target)
            if authorization is not None:
                call.headers = (("authorization", authorization),)
            run.begin()
            caller = call.caller if isinstance(call.caller, Caller) else OPEN
            response, hit = await front_end.serve(request, target, caller.limits)
        except HttpProcessingError:
            failure = HttpError(400, "the request body is incomplete or malformed", close=True)
        except ConnectionError as exc:
            # The client went away (e.g. mid-upload): nothing stored, no one to answer.
            failure = HttpError(499, f"connection lost: {exc}", close=True)
        except Exception as exc:
            failure = exc
        if failure is not None:
            response = self._refusal(call, request, front_end, failure)
        call.notes["http.status"] = response.status
        call.notes["http.hit"] = hit
        call.notes["http.received"] = request.content.total_bytes
        if verb != "HEAD":
            call.notes["http.sent"] = response.content_length or 0
        if failure is None:
            run.end_with(grpc.StatusCode.OK, "")
        elif isinstance(failure, RpcError):
            run.end_with(failure.code, failure.message)
        else:
            run.end_with(_GRPC_CODE.get(response.status, grpc.StatusCode.INTERNAL), call.details)
        return response

    def _refusal(
        self,
        call: Call,
        request: web.Request,
        front_end: HttpFrontEnd | None,
        exc: BaseException,
    ) -> web.StreamResponse:
        status, message = http_status_of(exc)
        if status == 500:
            log.error("internal error serving %s: %r", call.method, exc, exc_info=exc)
        call.details = message
        code = exc.code if isinstance(exc, HttpError) else None
        if front_end is None:
            response = text(status, message)
        else:
            response = front_end.refusal(request, status, message, code)
        if response.status == 401:
            challenge = front_end.challenge(request) if front_end is not None else None
            response.headers["WWW-Authenticate"] = challenge or 'Bearer realm="slipstream"'
        if isinstance(exc, _MethodNotAllowed):
            response.headers["Allow"] = ", ".join(exc.allowed)
        if status >= 400 and status not in (401, 403, 404, 405, 429, 503):
            response.force_close()  # the body may be unread
        elif isinstance(exc, HttpError) and exc.close:
            response.force_close()
        return response


class _MethodNotAllowed(HttpError):
    def __init__(self, verb: str, route: str, allowed: tuple[str, ...]) -> None:
        super().__init__(405, f"{verb} is not served on {route} paths")
        self.allowed = allowed
