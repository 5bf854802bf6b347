"""ccache's remote storage over HTTP, under the reserved first path segment `ccache`.

    GET/HEAD/PUT/DELETE  /ccache/[NAME/]KEY   ccache entries, in any of ccache's layouts:
                                             subdirs  3b/964j95...  (2 + 31 characters)
                                             flat     3b964j95...   (33 characters)
                                             bazel    ac/<64 hex digits>

ccache: `remote_storage = http://HOST:PORT/ccache[/NAME]|layout=subdirs`. A ccache
entry is not an action result (nothing to check it against), so it lives apart
from the action cache: its content is a CAS blob, and the key an evictable
"ccache" record pointing at it (KeyedBlobs). ccache never evicts remote entries
itself; the store's size bound and LRU do. GET and HEAD need `read`; a PUT or
DELETE needs `ac-write` and `cas-write` (the key is taken on trust, so whoever may
write one can poison every compile that reads it) and is audited.
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
    Target,
    blob_response,
    check_length,
    head_response,
    text,
)

CCACHE_NAMESPACE = "ccache"
CCACHE_PREFIX = "ccache"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CCACHE_DIR = re.compile(r"[0-9a-f]{2}")
_CCACHE_REST = re.compile(r"[0-9a-v]{31}")
_CCACHE_FLAT = re.compile(r"[0-9a-f]{2}[0-9a-v]{31}")
_WRITE = (AC_WRITE, CAS_WRITE)


class CcacheStorage(HttpFrontEnd):
    prefix = CCACHE_PREFIX
    scopes = {
        ("ccache", "GET"): (READ,),
        ("ccache", "HEAD"): (READ,),
        ("ccache", "PUT"): _WRITE,
        ("ccache", "DELETE"): _WRITE,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entries = KeyedBlobs(self.store, CCACHE_NAMESPACE)

    def parse(self, segments: list[str], shown: str) -> Target:
        rest = segments
        if len(rest) >= 2 and rest[-2] == "ac" and _HEX64.fullmatch(rest[-1]):
            name, key = rest[:-2], f"ac/{rest[-1]}"  # layout=bazel
        elif (
            len(rest) >= 2 and _CCACHE_DIR.fullmatch(rest[-2]) and _CCACHE_REST.fullmatch(rest[-1])
        ):
            name, key = rest[:-2], rest[-2] + rest[-1]  # layout=subdirs
        elif rest and _CCACHE_FLAT.fullmatch(rest[-1]):
            name, key = rest[:-1], rest[-1]  # layout=flat
        else:
            raise HttpError(
                400,
                f"path {shown!r} is not a ccache entry: /ccache/[NAME/]KEY with a 33-character "
                "KEY (layout flat), KEY as 2/31 characters (subdirs) or ac/SHA256 (bazel)",
            )
        instance = "/".join(name)
        # subdirs and flat name the same entry; the bazel layout's keys are different strings.
        return Target("ccache", instance, f"{instance}/{key}" if instance else key)

    def audit(self, method: str, target: Target) -> dict[str, object] | None:
        if method in ("PUT", "DELETE"):
            return {"event": f"ccache_{method.lower()}", "key": target.key}
        return None

    async def serve(
        self, request: web.Request, target: Target, limits: Any
    ) -> tuple[web.StreamResponse, bool | None]:
        method = request.method
        if method in ("PUT", "DELETE") and not self.backend.update_enabled:
            raise HttpError(403, "ccache updates are disabled (--read-only-ac)")
        if method == "PUT":
            check_length(request, limits.max_blob_size, "a ccache entry")
            await self.entries.put_body(self.backend, request, target.key, limits.max_blob_size)
            return text(200, "stored"), None
        if method == "DELETE":
            await self.backend.run(self.entries.delete, target.key)
            return text(200, "deleted"), None
        missing = f"no ccache entry {target.key}"
        if method == "HEAD":
            found = await self.entries.find_on(self.backend, target.key)
            return await head_response(request, found[0].size if found else None, missing)
        opened = await self.entries.open_on(self.backend, target.key)
        return await blob_response(
            self.backend, request, None if opened is None else opened[0], missing
        )
