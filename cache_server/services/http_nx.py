"""Nx's self-hosted remote cache (its published OpenAPI), under the reserved first segment `v1`.

    PUT  /v1/cache/HASH   a task's outputs (a tar, as nx packs them): 200 stored, 409 if
                          HASH is there already (an entry is never overwritten), 400
                          without a Content-Length
    GET  /v1/cache/HASH   200 with the tar, 404

nx: `NX_SELF_HOSTED_REMOTE_CACHE_SERVER=http://HOST:PORT` and
`NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN=TOKEN`. An entry's bytes are a CAS blob and its
hash an evictable "nx" record pointing at it (KeyedBlobs). GET needs `read`; a PUT needs
`cas-write` and `ac-write` (the hash is taken on trust) and is audited.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from slipstream.cache_server.auth import AC_WRITE, CAS_WRITE, READ
from slipstream.cache_server.services.common import HttpError
from slipstream.cache_server.services.http_common import (
    HttpFrontEnd,
    KeyedBlobs,
    Lookups,
    Target,
    blob_response,
    check_length,
    text,
)

NX_NAMESPACE = "nx"
NX_PREFIX = "v1"
ROUTE = "nx"

# Nx's task hashes are decimal digits (an xxhash64); letters are let in for other versions.
_HASH = re.compile(r"[0-9A-Za-z]{1,100}")


class NxCache(HttpFrontEnd):
    prefix = NX_PREFIX
    scopes = {
        (ROUTE, "GET"): (READ,),
        (ROUTE, "PUT"): (AC_WRITE, CAS_WRITE),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entries = KeyedBlobs(self.store, NX_NAMESPACE)

    def parse(self, segments: list[str], shown: str) -> Target:
        if len(segments) != 2 or segments[0] != "cache":
            raise HttpError(404, f"path {shown!r} is not an Nx cache path (/v1/cache/HASH)")
        if not _HASH.fullmatch(segments[1]):
            raise HttpError(400, f"{segments[1][:80]!r} is not an Nx hash: 1-100 letters or digits")
        return Target(ROUTE, "", segments[1])

    def audit(self, method: str, target: Target) -> dict[str, object] | None:
        if method == "PUT":
            return {"event": "nx_put", "hash": target.key}
        return None

    async def serve(
        self, request: web.Request, target: Target, limits: Any
    ) -> tuple[web.StreamResponse, Lookups]:
        if request.method == "PUT":
            if not self.backend.update_enabled:
                raise HttpError(403, "Nx cache uploads are disabled (--read-only-ac)")
            if request.content_length is None:
                raise HttpError(400, "a PUT needs a Content-Length header", close=True)
            check_length(request, limits.max_blob_size, "a task output")
            if await self.entries.find_on(self.backend, target.key) is not None:
                raise HttpError(409, f"{target.key} is stored already; entries are not overwritten")
            stored = await self.entries.put_body(
                self.backend, request, target.key, limits.max_blob_size, overwrite=False
            )
            if not stored:  # another upload of the same hash got there first
                raise HttpError(409, f"{target.key} is stored already; entries are not overwritten")
            return text(200, "stored"), None
        opened = await self.entries.open_on(self.backend, target.key)
        missing = f"no Nx entry {target.key}"
        return await blob_response(
            self.backend, request, None if opened is None else opened[0], missing
        )
