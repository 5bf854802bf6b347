"""sccache's WebDAV storage, under the reserved first path segment `sccache`.

    GET/HEAD/PUT/DELETE  /sccache/PATH    entries: compile results, under opaque paths
                                          (sccache's own: [NAME/]a/b/c/<64 hex>,
                                          [NAME/].sccache_check)
    MKCOL                /sccache/PATH/   a collection (a "directory" level)
    PROPFIND             /sccache/PATH[/] Depth 0 or 1: a minimal multistatus answer

sccache: `SCCACHE_WEBDAV_ENDPOINT=http://HOST:PORT/sccache[/NAME]` and, with tokens,
`SCCACHE_WEBDAV_TOKEN=TOKEN` (or SCCACHE_WEBDAV_USERNAME/PASSWORD: the password is the
token). A path has at most 16 levels of letters, digits and _.~- and no '.' or '..'
level. An entry's content is a CAS blob and its path an evictable "sccache" record
pointing at it (KeyedBlobs); collections are small "sccache_dirs" records that MKCOL
makes (the root always exists). Every collection level is answered as a WebDAV server
would for what sccache does with it: PROPFIND says whether it exists, MKCOL makes it
(405 if it exists). GET, HEAD and PROPFIND need `read`; PUT, DELETE and MKCOL need
`cas-write` and `ac-write` (an entry is taken on trust) and are audited.
"""

from __future__ import annotations

import email.utils
from typing import Any
from xml.sax.saxutils import escape

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
    head_response,
    text,
)
from slipstream.cache_server.storage.base import RecordKeyError, encode_record_key

SCCACHE_NAMESPACE = "sccache"
SCCACHE_DIRS_NAMESPACE = "sccache_dirs"
SCCACHE_PREFIX = "sccache"
ROUTE = "sccache"
MAX_DEPTH = 16
MAX_PROPFIND_BODY = 64 << 10
MAX_LISTED = 1000
_WRITE = (AC_WRITE, CAS_WRITE)
_READERS = ("GET", "HEAD", "PROPFIND")


class SccacheWebdav(HttpFrontEnd):
    prefix = SCCACHE_PREFIX
    scopes = {
        **{(ROUTE, method): (READ,) for method in _READERS},
        **{(ROUTE, method): _WRITE for method in ("PUT", "DELETE", "MKCOL")},
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entries = KeyedBlobs(self.store, SCCACHE_NAMESPACE)

    def check_segments(self, segments: list[str], shown: str) -> list[str]:
        if segments and segments[-1] == "":  # a collection: /sccache/NAME/ is /sccache/NAME
            segments = segments[:-1]
        return super().check_segments(segments, shown)

    def parse(self, segments: list[str], shown: str) -> Target:
        if len(segments) > MAX_DEPTH:
            raise HttpError(400, f"path {shown!r} has more than {MAX_DEPTH} levels")
        path = "/".join(segments)
        if path:
            try:
                encode_record_key(SCCACHE_NAMESPACE, path)
            except RecordKeyError:
                raise HttpError(400, f"path {shown!r} is too long for an sccache entry") from None
        return Target(ROUTE, "", path)

    def audit(self, method: str, target: Target) -> dict[str, object] | None:
        if method in ("PUT", "DELETE", "MKCOL"):
            return {"event": f"sccache_{method.lower()}", "path": target.key}
        return None

    async def serve(
        self, request: web.Request, target: Target, limits: Any
    ) -> tuple[web.StreamResponse, Lookups]:
        method, path = request.method, target.key
        if method in ("PUT", "DELETE", "MKCOL"):
            if not self.backend.update_enabled:
                raise HttpError(403, "sccache updates are disabled (--read-only-ac)")
            if not path:
                raise HttpError(405, "the root collection cannot be written")
        if method == "PROPFIND":
            return await self._propfind(request, path), None
        if method == "MKCOL":
            if request.content_length:
                raise HttpError(415, "MKCOL takes no body", close=True)
            made = await self.backend.run(self._make_collection, path)
            if not made:
                return text(405, f"{path} exists already"), None
            return text(201, "created"), None
        if method == "PUT":
            check_length(request, limits.max_blob_size, "an sccache entry")
            await self.entries.put_body(self.backend, request, path, limits.max_blob_size)
            return text(201, "stored"), None
        if method == "DELETE":
            await self.backend.run(self.entries.delete, path)
            return web.Response(status=204), None
        missing = f"no sccache entry {path or '/'}"
        if not path:
            return text(404, missing), None
        if method == "HEAD":
            found = await self.entries.find_on(self.backend, path)
            return await head_response(request, found[0].size if found else None, missing)
        opened = await self.entries.open_on(self.backend, path)
        return await blob_response(
            self.backend, request, None if opened is None else opened[0], missing
        )

    # ---- collections ----
    def _is_collection(self, path: str) -> bool:
        return not path or self.store.get_record(SCCACHE_DIRS_NAMESPACE, path) is not None

    def _make_collection(self, path: str) -> bool:
        """Make the collection path; False if something is there already."""
        if self._is_collection(path) or self.entries.lookup(path) is not None:
            return False
        return self.store.put_record(SCCACHE_DIRS_NAMESPACE, path, b"", overwrite=False)

    def _children(self, path: str) -> list[tuple[str, int | None]]:
        """Up to MAX_LISTED (name, size) of path's members; size None for a collection."""
        prefix = f"{path}/" if path else ""
        members: dict[str, int | None] = {}
        for namespace in (SCCACHE_DIRS_NAMESPACE, SCCACHE_NAMESPACE):
            for info in self.store.list_records(namespace, prefix, MAX_LISTED * 4):
                name, _, deeper = info.key[len(prefix) :].partition("/")
                if deeper or not name:
                    members.setdefault(name, None)  # an implied collection level
                elif namespace == SCCACHE_DIRS_NAMESPACE:
                    members[name] = None
                else:
                    blob = self.entries.lookup(info.key)
                    if blob is not None:
                        members[name] = blob.size
                if len(members) >= MAX_LISTED:
                    break
        members.pop("", None)
        return sorted(members.items())

    async def _propfind(self, request: web.Request, path: str) -> web.Response:
        check_length(request, MAX_PROPFIND_BODY, "a PROPFIND body")
        await request.content.read(MAX_PROPFIND_BODY)  # which properties: all are answered
        depth = request.headers.get("Depth", "infinity").strip().lower()
        if depth not in ("0", "1"):
            raise HttpError(403, "PROPFIND answers Depth 0 or 1, not infinity")

        def look() -> tuple[int | None, bool, list[tuple[str, int | None]]]:
            blob = self.entries.lookup(path) if path else None
            if blob is not None:
                return blob.size, True, []
            if not self._is_collection(path):
                return None, False, []
            return None, True, self._children(path) if depth == "1" else []

        size, exists, children = await self.backend.run(look)
        if not exists:
            raise HttpError(404, f"nothing at /sccache/{path}")
        base = f"/{SCCACHE_PREFIX}/{path}" if path else f"/{SCCACHE_PREFIX}"
        responses = [_dav_response(base, size)]
        responses += [_dav_response(f"{base}/{name}", child) for name, child in children]
        xml = (
            '<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus xmlns:D="DAV:">'
            + "".join(responses)
            + "</D:multistatus>\n"
        )
        return web.Response(status=207, text=xml, content_type="application/xml", charset="utf-8")


def _dav_response(href: str, size: int | None) -> str:
    """One <D:response>: a collection (size None) or an entry of size bytes."""
    modified = email.utils.formatdate(usegmt=True)
    if size is None:
        href += "/"
        props = "<D:resourcetype><D:collection/></D:resourcetype>"
    else:
        props = (
            "<D:resourcetype/>"
            f"<D:getcontentlength>{size}</D:getcontentlength>"
            "<D:getcontenttype>application/octet-stream</D:getcontenttype>"
        )
    return (
        f"<D:response><D:href>{escape(href)}</D:href><D:propstat><D:prop>{props}"
        f"<D:getlastmodified>{modified}</D:getlastmodified></D:prop>"
        "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
    )
