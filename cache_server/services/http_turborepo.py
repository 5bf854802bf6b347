"""Turborepo's remote cache API, under the reserved first path segment `v8`.

    PUT/GET/HEAD  /v8/artifacts/HASH       an artifact (a task's outputs, as turbo packs
                                           them); x-artifact-duration and x-artifact-tag
                                           are kept with it and answered on GET and HEAD
    POST          /v8/artifacts            {"hashes": [...]}: which exist, with size,
                                           duration and tag
    GET           /v8/artifacts/status     {"status": "enabled"}
    POST          /v8/artifacts/events     turbo's report of its cache hits and misses:
                                           counted in the metrics (turborepo_events)

turbo: `TURBO_API=http://HOST:PORT TURBO_TOKEN=TOKEN TURBO_TEAM=NAME`. Each request's
`?teamId=` (or, without one, `?slug=`) names a namespace: a team reads only its own
artifacts. An artifact's bytes are a CAS blob and its hash an evictable "turborepo"
record pointing at it (KeyedBlobs), so identical outputs are stored once. Reading needs
`read`; a PUT needs `cas-write` and `ac-write` (the hash is taken on trust: whoever may
write one can poison every build that reads it) and is audited. Signed artifacts
(TURBO_REMOTE_CACHE_SIGNATURE_KEY) are verified by turbo itself against the tag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from slipstream.cache_server.auth import AC_WRITE, CAS_WRITE, READ
from slipstream.cache_server.services.common import HttpError
from slipstream.cache_server.services.http_common import (
    SEGMENT,
    HttpFrontEnd,
    KeyedBlobs,
    Lookups,
    Target,
    blob_response,
    check_length,
    head_response,
)

TURBOREPO_NAMESPACE = "turborepo"
TURBOREPO_PREFIX = "v8"
ARTIFACT = "turborepo"
QUERY = "turborepo_query"
STATUS = "turborepo_status"
EVENTS = "turborepo_events"

_HASH = re.compile(r"[0-9a-fA-F]{1,100}")
_DURATION = re.compile(r"[0-9]{1,15}")
_TAG = re.compile(r"[A-Za-z0-9+/=_-]{1,600}")
MAX_QUERY_HASHES = 1000
MAX_JSON_BODY = 1 << 20
_WRITE = (AC_WRITE, CAS_WRITE)
_ERROR_CODES = {
    401: "not_authorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "rate_limited",
    503: "unavailable",
}


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data) + "\n", content_type="application/json"
    )


class TurborepoCache(HttpFrontEnd):
    prefix = TURBOREPO_PREFIX
    scopes = {
        (ARTIFACT, "GET"): (READ,),
        (ARTIFACT, "HEAD"): (READ,),
        (ARTIFACT, "PUT"): _WRITE,
        (QUERY, "POST"): (READ,),
        (STATUS, "GET"): (READ,),
        (EVENTS, "POST"): (READ,),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.artifacts = KeyedBlobs(self.store, TURBOREPO_NAMESPACE)

    def parse(self, segments: list[str], shown: str) -> Target:
        return self.parse_request(segments, shown, {})

    def parse_request(self, segments: list[str], shown: str, query: Mapping[str, str]) -> Target:
        team = query.get("teamId") or query.get("slug") or ""
        if team and not SEGMENT.fullmatch(team):
            raise HttpError(400, "teamId and slug are 1-100 letters, digits and _.~-")
        if segments == ["artifacts"]:
            return Target(QUERY, team, "")
        if segments == ["artifacts", "status"]:
            return Target(STATUS, team, "")
        if segments == ["artifacts", "events"]:
            return Target(EVENTS, team, "")
        if len(segments) == 2 and segments[0] == "artifacts":
            if not _HASH.fullmatch(segments[1]):
                raise HttpError(
                    400, f"{segments[1][:80]!r} is not a Turborepo hash: 1-100 hex digits"
                )
            return Target(ARTIFACT, team, segments[1])
        raise HttpError(
            404, f"path {shown!r} is not a Turborepo remote cache path (/v8/artifacts/...)"
        )

    def refusal(
        self, request: web.Request, status: int, message: str, code: str | None
    ) -> web.Response:
        # turbo reads an error as Vercel's API sends it, {"error": {"code", "message"}}
        # (and a 403 whose code is not remote_caching_* as "not this one", going on).
        if code is None:
            code = _ERROR_CODES.get(status, "bad_request" if status < 500 else "internal_error")
        line = " ".join(message.split())[:500]
        return _json({"error": {"code": code, "message": line}}, status=status)

    @staticmethod
    def key(team: str, hash_: str) -> str:
        return f"{team}/{hash_}" if team else hash_

    def audit(self, method: str, target: Target) -> dict[str, object] | None:
        if target.route == ARTIFACT and method == "PUT":
            return {"event": "turborepo_put", "team": target.instance, "hash": target.key}
        return None

    async def serve(
        self, request: web.Request, target: Target, limits: Any
    ) -> tuple[web.StreamResponse, Lookups]:
        if target.route == STATUS:
            return _json({"status": "enabled"}), None
        if target.route == EVENTS:
            return await self._events(request)
        if target.route == QUERY:
            return await self._query(request, target.instance), None
        key = self.key(target.instance, target.key)
        method = request.method
        if method == "PUT":
            return await self._put(request, key, limits.max_blob_size), None
        missing = f"no Turborepo artifact {target.key}"
        if method == "HEAD":
            found = await self.artifacts.find_on(self.backend, key)
            if found is None:
                return await head_response(request, None, missing)
            return await head_response(request, found[0].size, missing, _headers(found[1]))
        opened = await self.artifacts.open_on(self.backend, key)
        if opened is None:
            return await blob_response(self.backend, request, None, missing)
        return await blob_response(self.backend, request, opened[0], missing, _headers(opened[1]))

    async def _put(self, request: web.Request, key: str, limit: int | None) -> web.Response:
        if not self.backend.update_enabled:
            raise HttpError(403, "Turborepo artifact uploads are disabled (--read-only-ac)")
        metadata: dict[str, str] = {}
        duration = request.headers.get("x-artifact-duration")
        if duration is not None:
            if not _DURATION.fullmatch(duration):
                raise HttpError(400, "x-artifact-duration is not a number of milliseconds")
            metadata["duration"] = duration
        tag = request.headers.get("x-artifact-tag")
        if tag is not None:
            if not _TAG.fullmatch(tag):
                raise HttpError(400, "x-artifact-tag is not 1-600 characters of base64")
            metadata["tag"] = tag
        check_length(request, limit, "an artifact")
        await self.artifacts.put_body(self.backend, request, key, limit, metadata)
        return _json({"urls": [request.path]}, status=202)

    async def _read_json(self, request: web.Request) -> Any:
        check_length(request, MAX_JSON_BODY, "a JSON body")
        data = await request.content.read(MAX_JSON_BODY + 1)
        if len(data) > MAX_JSON_BODY:
            raise HttpError(413, f"a JSON body is over {MAX_JSON_BODY:,} bytes", close=True)
        try:
            return json.loads(data)
        except ValueError:
            raise HttpError(400, "the body is not JSON") from None

    async def _query(self, request: web.Request, team: str) -> web.Response:
        doc = await self._read_json(request)
        hashes = doc.get("hashes") if isinstance(doc, dict) else None
        if (
            not isinstance(hashes, list)
            or len(hashes) > MAX_QUERY_HASHES
            or not all(isinstance(h, str) and _HASH.fullmatch(h) for h in hashes)
        ):
            raise HttpError(
                400, f'the body is not {{"hashes": [up to {MAX_QUERY_HASHES} hex hashes]}}'
            )

        def answer() -> dict[str, object]:
            out: dict[str, object] = {}
            for h in hashes:
                found = self.artifacts.find(self.key(team, h))
                if found is None:
                    out[h] = {"error": {"message": "The artifact was not found"}}
                    continue
                blob, metadata = found
                entry: dict[str, object] = {
                    "size": blob.size,
                    "taskDurationMs": int(metadata.get("duration", "0")),
                }
                if "tag" in metadata:
                    entry["tag"] = metadata["tag"]
                out[h] = entry
            return out

        return _json(await self.backend.run(answer))

    async def _events(self, request: web.Request) -> tuple[web.Response, Lookups]:
        doc = await self._read_json(request)
        if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
            raise HttpError(400, "the body is not a JSON array of cache events")
        hits = sum(1 for e in doc if e.get("event") == "HIT")
        misses = sum(1 for e in doc if e.get("event") == "MISS")
        return web.Response(status=200), (hits, misses)


def _headers(metadata: Mapping[str, str]) -> dict[str, str]:
    """The headers an artifact is answered with: what turbo sent with it."""
    headers = {"x-artifact-duration": metadata.get("duration", "0")}
    if "tag" in metadata:
        headers["x-artifact-tag"] = metadata["tag"]
    return headers
