"""Bazel's HTTP remote cache: CAS blobs and action results over plain HTTP.

    GET/HEAD/PUT  /[INSTANCE/]cas/SHA256   CAS blobs; a PUT is verified (hash, and
                                           size = body length) before it is visible
    GET/HEAD/PUT  /[INSTANCE/]ac/SHA256    action results (a serialized ActionResult),
                                           the entries of the gRPC ActionCache under
                                           the same instance name; a GET answers 404
                                           unless every blob the result names is there

Bazel: `--remote_cache=http://HOST:PORT[/INSTANCE]`. These are the paths no other
front end reserves a first segment of. GET and HEAD need `read`, a PUT to /cas
`cas-write`, a PUT to /ac `ac-write` (audited). A CAS PUT streams straight into
the store's verifying writer; one without a length is hashed on the way in.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError

from slipstream.cache_server.auth import AC_WRITE, CAS_WRITE, READ
from slipstream.cache_server.services.action_cache import AC_NAMESPACE, action_key, referenced_blobs
from slipstream.cache_server.services.common import MAX_BATCH_TOTAL_SIZE, HttpError
from slipstream.cache_server.services.http_common import (
    HttpFrontEnd,
    Target,
    blob_response,
    body,
    check_length,
    head_response,
    open_blob,
    put_blob_body,
    text,
)
from slipstream.core.digests import BlobId, DigestError
from slipstream.protos import remote_execution_pb2 as re_pb2

_HEX64 = re.compile(r"[0-9a-f]{64}")


class BazelHttpCache(HttpFrontEnd):
    scopes = {
        ("cas", "GET"): (READ,),
        ("cas", "HEAD"): (READ,),
        ("cas", "PUT"): (CAS_WRITE,),
        ("ac", "GET"): (READ,),
        ("ac", "HEAD"): (READ,),
        ("ac", "PUT"): (AC_WRITE,),
    }

    def parse(self, segments: list[str], shown: str) -> Target:
        if len(segments) < 2 or segments[-2] not in ("cas", "ac"):
            raise HttpError(
                400,
                f"path {shown!r} is not /[INSTANCE/]cas/SHA256 or /[INSTANCE/]ac/SHA256, "
                "nor a path of another protocol served here",
            )
        route, sha256 = segments[-2], segments[-1]
        if not _HEX64.fullmatch(sha256):
            raise HttpError(400, f"{sha256[:80]!r} is not a SHA-256: 64 lowercase hex digits")
        return Target(route, "/".join(segments[:-2]), sha256)

    def audit(self, method: str, target: Target) -> dict[str, object] | None:
        if target.route == "ac" and method == "PUT":
            return {"event": "ac_write", "instance": target.instance, "action_digest": target.key}
        return None

    async def serve(
        self, request: web.Request, target: Target, limits: Any
    ) -> tuple[web.StreamResponse, bool | None]:
        method = request.method
        if target.route == "cas":
            if method == "PUT":
                await put_blob_body(self.backend, request, target.key, limits.max_blob_size)
                return text(200, "stored"), None
            missing = f"no cas entry {target.key}"
            if method == "HEAD":
                blob = await self.backend.run(self.store.find_blob, target.key)
                return await head_response(request, blob.size if blob else None, missing)
            opened = await self.backend.run(self._open_cas, target.key)
            return await blob_response(self.backend, request, opened, missing)
        key = action_key(target.instance, BlobId(target.key, 0))  # the size is not in keys
        if method == "PUT":
            if not self.backend.update_enabled:
                raise HttpError(403, "action cache updates are disabled (--read-only-ac)")
            await self._put_ac(request, key)
            return text(200, "stored"), None
        data = await self.backend.run(self._complete_result, key)
        missing = f"no complete action result for {target.key}"
        if method == "HEAD":
            return await head_response(request, None if data is None else len(data), missing)
        if data is None:
            return text(404, missing), False
        return web.Response(body=data, content_type="application/octet-stream"), True

    # ---- reads ----
    def _open_cas(self, sha256: str) -> Any:
        blob = self.store.find_blob(sha256)
        return None if blob is None else open_blob(self.store, blob)

    def _complete_result(self, key: str) -> bytes | None:
        """The stored action result, if every blob it names is present (see action_cache)."""
        data = self.store.get_record(AC_NAMESPACE, key)
        if data is None:
            return None
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
            needed = referenced_blobs(self.store, result)
        except (DecodeError, DigestError):
            return None
        if needed is None or self.store.find_missing(needed):
            return None
        return data

    # ---- writes ----
    async def _put_ac(self, request: web.Request, key: str) -> None:
        check_length(request, MAX_BATCH_TOTAL_SIZE, "an action result")
        data = b"".join([c async for c in body(request, MAX_BATCH_TOTAL_SIZE)])
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
        except DecodeError:
            raise HttpError(400, "the body is not a serialized ActionResult") from None
        try:
            for out in result.output_files:
                BlobId.from_proto(out.digest)
            for out_dir in result.output_directories:
                BlobId.from_proto(out_dir.tree_digest)
        except DigestError as exc:
            raise HttpError(400, f"the action result names a bad digest: {exc}") from None
        await self.backend.run(self.store.put_record, AC_NAMESPACE, key, result.SerializeToString())
