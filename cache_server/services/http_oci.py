"""An OCI registry (the Distribution Specification v1.1) under the reserved first path segment `v2`.

    GET           /v2/                                   200: a registry is served here
    GET           /v2/token                              the Docker token flow's realm
    GET/HEAD      /v2/NAME/blobs/DIGEST                  a blob (Range: 206, or 416)
    POST          /v2/NAME/blobs/uploads/                an upload session (202); with
                                                         ?digest= a monolithic upload (201),
                                                         with ?mount=DIGEST&from=REPO a mount
    GET/PATCH/PUT/DELETE  /v2/NAME/blobs/uploads/ID      a session: status, a chunk,
                                                         finish (?digest=), cancel
    GET/HEAD/PUT/DELETE   /v2/NAME/manifests/REFERENCE   a manifest by tag or digest
    GET           /v2/NAME/tags/list                     tags, paginated with ?n=&last=
    GET           /v2/NAME/referrers/DIGEST              manifests whose subject is DIGEST
                                                         (an index; ?artifactType= filters)

One CAS: a blob (a layer, an image config, a manifest) is the store's CAS blob of
its SHA-256, shared with every other protocol, bounded by the same LRU. A manifest
is known to a repository by an evictable "oci-manifests" record (NAME@DIGEST ->
media type), a tag by an evictable "oci-tags" record (NAME:TAG -> DIGEST), a
referrer by an "oci-referrers" record, so replicas on one S3 bucket serve what any
of them took in. A manifest is taken only when every blob it names is present
(MANIFEST_BLOB_UNKNOWN), and served only while they still are (else 404),
refreshing them in the LRU. A repository under a --registry-upstream is a
pull-through mirror (oci_upstream): what the store lacks is fetched from there.

Upload sessions (services/oci_sessions.py) live in this server process, or with
`serve --workers N` in files every worker shares, so that the requests of one
session may reach any worker. A session's bytes go into the store's verifying
writer when the client finishes it, so nothing is visible before it matches its
digest. A caller has at most 64 sessions (a new one ends its oldest), and a session
idle for --upload-idle-timeout is cleaned up, with its bytes.

Scopes: pulls need `read`, blob uploads `cas-write`, a manifest or tag PUT or
DELETE `ac-write` (a tag is a trusted pointer, like an action result; audited).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from slipstream.cache_server.auth import AC_WRITE, CAS_WRITE, READ, current_caller
from slipstream.cache_server.calls import current_call
from slipstream.cache_server.services.common import HttpError
from slipstream.cache_server.services.http_common import (
    CHUNK,
    HttpFrontEnd,
    Target,
    body,
    check_length,
    head,
    open_blob,
    put_blob_body,
    stream,
)
from slipstream.cache_server.services.oci_sessions import UploadSession, open_upload_sessions
from slipstream.cache_server.services.oci_upstream import (
    Upstream,
    Upstreams,
    UpstreamUnavailable,
    parse_upstream,
)
from slipstream.cache_server.storage.base import BlobWriter, Store
from slipstream.core.digests import BlobId, DigestError

log = logging.getLogger("cache_server")

OCI_PREFIX = "v2"
MANIFESTS_NAMESPACE = "oci-manifests"
TAGS_NAMESPACE = "oci-tags"
REFERRERS_NAMESPACE = "oci-referrers"
MAX_MANIFEST_SIZE = 4 << 20  # what the reference registry takes
MAX_TAGS_PAGE = 10_000

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

_SEGMENT = re.compile(r"[A-Za-z0-9_.~:-]{1,255}")
_NAME_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+")
_SHA256_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?([0-9]{1,20})-([0-9]{1,20})(?:/[0-9*]+)?")
_RANGE = re.compile(r"bytes=([0-9]{0,20})-([0-9]{0,20})")

# The spec's error code of each status, where the refusal names none itself.
_CODE_OF_STATUS = {
    400: "UNSUPPORTED",
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NOT_FOUND",
    405: "UNSUPPORTED",
    413: "SIZE_INVALID",
    416: "RANGE_INVALID",
    429: "TOOMANYREQUESTS",
}


def _oci_error(status: int, code: str, message: str) -> HttpError:
    return HttpError(status, message, code=code)


def parse_digest(text: str) -> BlobId:
    """The CAS blob (size unknown: 0) a digest names; DIGEST_INVALID unless sha256."""
    m = _SHA256_DIGEST.fullmatch(text)
    if m is None:
        what = (
            "uses an algorithm not served here (only sha256)"
            if _DIGEST.fullmatch(text)
            else ("is not a digest (sha256:<64 lowercase hex digits>)")
        )
        raise _oci_error(400, "DIGEST_INVALID", f"{text[:80]!r} {what}")
    return BlobId(m.group(1), 0)


def _digest_of(blob: BlobId) -> str:
    return f"sha256:{blob.hash}"


def _check_name(name: list[str], shown: str) -> str:
    joined = "/".join(name)
    if not name or len(joined) > 150 or not all(_NAME_COMPONENT.fullmatch(c) for c in name):
        raise _oci_error(
            400,
            "NAME_INVALID",
            f"path {shown!r} names no valid repository: lowercase components "
            "[a-z0-9]+ joined by . _ __ or -, separated by /, up to 150 characters",
        )
    return joined


@dataclass(frozen=True)
class StoredManifest:
    """A manifest of a repository: its blob and media type."""

    blob: BlobId
    media_type: str


def _referenced(manifest: Mapping[str, Any], media_type: str) -> tuple[list[str], list[str]]:
    """(blob digests, child manifest digests) a parsed manifest names; ValueError if malformed.

    An index's entries are manifests, except those whose media type says they are
    not: BuildKit's registry cache is an index of its cache config and layers."""
    blobs: list[str] = []
    children: list[str] = []
    if media_type in INDEX_TYPES:
        entries = manifest.get("manifests")
        if not isinstance(entries, list):
            raise ValueError("an index needs a 'manifests' list")
        for entry in entries:
            kind = entry.get("mediaType") if isinstance(entry, dict) else None
            is_blob = isinstance(kind, str) and kind not in MANIFEST_TYPES
            (blobs if is_blob else children).append(_descriptor_digest(entry))
        return blobs, children
    config = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ValueError("an image manifest needs a 'layers' list")
    blobs.append(_descriptor_digest(config))
    for layer in layers:
        if isinstance(layer, dict) and layer.get("mediaType") == _FOREIGN_LAYER:
            continue  # fetched from its urls, never pushed
        blobs.append(_descriptor_digest(layer))
    return blobs, children


def _descriptor_digest(descriptor: Any) -> str:
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
        raise ValueError("a descriptor needs a 'digest'")
    digest: str = descriptor["digest"]
    return digest


def manifest_media_type(data: bytes, content_type: str | None) -> tuple[str, dict[str, Any]]:
    """A manifest's media type and parsed form; MANIFEST_INVALID unless one served here."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _oci_error(400, "MANIFEST_INVALID", "the manifest is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
        raise _oci_error(400, "MANIFEST_INVALID", "the manifest is not a schemaVersion 2 object")
    declared = manifest.get("mediaType")
    given = (content_type or "").split(";")[0].strip()
    media_type = declared if isinstance(declared, str) else given
    if not media_type:
        media_type = OCI_INDEX if "manifests" in manifest else OCI_MANIFEST
    if media_type not in MANIFEST_TYPES:
        raise _oci_error(
            400,
            "MANIFEST_INVALID",
            f"manifest media type {media_type[:80]!r} is not served here: "
            + ", ".join(MANIFEST_TYPES),
        )
    if isinstance(declared, str) and given and given in MANIFEST_TYPES and given != declared:
        raise _oci_error(
            400, "MANIFEST_INVALID", f"Content-Type {given!r} but the manifest says {declared!r}"
        )
    return media_type, manifest


class Manifests:
    """Manifests and tags of repositories, as records beside their CAS blobs."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def resolve(
        self, repository: str, reference: str, tag_ttl: float | None = None
    ) -> BlobId | None:
        """The manifest blob (size unknown) a tag or digest names in repository; None for
        a tag fetched from an upstream more than tag_ttl seconds ago (if given)."""
        if ":" in reference:
            return parse_digest(reference)
        value = self.store.get_record(TAGS_NAMESPACE, f"{repository}:{reference}")
        if value is None:
            return None
        digest, _, fetched = value.decode(errors="replace").partition("\n")
        if tag_ttl is not None and fetched:
            try:
                if time.time() - float(fetched) > tag_ttl:
                    return None
            except ValueError:
                return None
        m = _SHA256_DIGEST.fullmatch(digest)
        return BlobId(m.group(1), 0) if m else None

    def record(self, repository: str, blob: BlobId) -> StoredManifest | None:
        value = self.store.get_record(MANIFESTS_NAMESPACE, f"{repository}@{_digest_of(blob)}")
        if value is None:
            return None
        media_type, _, size = value.decode(errors="replace").partition("\n")
        if not size.isdigit():
            return None
        return StoredManifest(BlobId(blob.hash, int(size)), media_type)

    def complete(
        self,
        repository: str,
        reference: str,
        *,
        mirrored: bool = False,
        tag_ttl: float | None = None,
    ) -> tuple[StoredManifest, bytes] | None:
        """The manifest a reference names and its bytes, if it and every blob it names
        (for an index, its child manifests and theirs) are present; refreshes them. In a
        mirrored repository, only the manifest itself (its blobs come from the upstream
        when asked for), and a tag fetched over tag_ttl seconds ago is not taken."""
        blob = self.resolve(repository, reference, tag_ttl)
        stored = None if blob is None else self.record(repository, blob)
        if stored is None:
            return None
        data = self.store.get_blob(stored.blob)
        if data is None:
            return None
        if mirrored:
            return stored, data
        try:
            blobs, children = _referenced(json.loads(data), stored.media_type)
            needed = [self._present_blob(d) for d in blobs]
            for child in children:
                child_blob = parse_digest(child)
                child_stored = self.record(repository, child_blob)
                child_data = (
                    None if child_stored is None else self.store.get_blob(child_stored.blob)
                )
                if child_stored is None or child_data is None:
                    return None
                grand, _ = _referenced(json.loads(child_data), child_stored.media_type)
                needed += [self._present_blob(d) for d in grand]
        except (ValueError, HttpError):
            return None
        if any(b is None for b in needed):
            return None
        return stored, data

    def _present_blob(self, digest: str) -> BlobId | None:
        return self.store.find_blob(parse_digest(digest).hash)

    def missing(self, repository: str, blobs: list[str], children: list[str]) -> list[str]:
        """The digests a manifest names that are not here (children: as manifests of repository)."""
        gone = [d for d in blobs if self.store.find_blob(parse_digest(d).hash) is None]
        for child in children:
            stored = self.record(repository, parse_digest(child))
            if stored is None or self.store.find_missing([stored.blob]):
                gone.append(child)
        return gone

    def put(
        self,
        repository: str,
        tag: str | None,
        media_type: str,
        data: bytes,
        fetched: float | None = None,
    ) -> BlobId:
        """Store a manifest (and tag it); fetched: when it came from an upstream, if it did."""
        blob = BlobId.of(data)
        if self.store.find_missing([blob]):
            self.store.put_blob(blob, data)
        key = f"{repository}@{_digest_of(blob)}"
        self.store.put_record(MANIFESTS_NAMESPACE, key, f"{media_type}\n{blob.size}".encode())
        if tag is not None:
            value = _digest_of(blob) + ("" if fetched is None else f"\n{fetched:.3f}")
            self.store.put_record(TAGS_NAMESPACE, f"{repository}:{tag}", value.encode())
        return blob

    def delete(self, repository: str, reference: str) -> bool:
        """Delete a tag, or a manifest by digest with the tags naming it; False if none."""
        if ":" not in reference:
            key = f"{repository}:{reference}"
            if self.store.get_record(TAGS_NAMESPACE, key) is None:
                return False
            self.store.delete_record(TAGS_NAMESPACE, key)
            return True
        blob = parse_digest(reference)
        if self.record(repository, blob) is None:
            return False
        digest = _digest_of(blob).encode()
        for info in self.store.list_records(TAGS_NAMESPACE, f"{repository}:"):
            value = self.store.get_record(TAGS_NAMESPACE, info.key) or b""
            if value.split(b"\n")[0] == digest:
                self.store.delete_record(TAGS_NAMESPACE, info.key)
        self.store.delete_record(MANIFESTS_NAMESPACE, f"{repository}@{_digest_of(blob)}")
        return True

    @staticmethod
    def _referrers_prefix(repository: str, subject: BlobId) -> str:
        # Keys stay under the record key limit whatever the repository's length.
        return f"{hashlib.sha256(repository.encode()).hexdigest()[:32]}/{subject.hash}/"

    def add_referrer(
        self,
        repository: str,
        subject: str,
        blob: BlobId,
        media_type: str,
        manifest: Mapping[str, Any],
    ) -> None:
        """Record a manifest as a referrer of the subject digest it names."""
        descriptor: dict[str, Any] = {
            "mediaType": media_type,
            "digest": _digest_of(blob),
            "size": blob.size,
        }
        config = manifest.get("config")
        artifact_type = manifest.get("artifactType") or (
            config.get("mediaType") if isinstance(config, dict) else None
        )
        if isinstance(artifact_type, str):
            descriptor["artifactType"] = artifact_type
        if isinstance(manifest.get("annotations"), dict):
            descriptor["annotations"] = manifest["annotations"]
        key = self._referrers_prefix(repository, parse_digest(subject)) + blob.hash
        self.store.put_record(REFERRERS_NAMESPACE, key, json.dumps(descriptor).encode())

    def referrers(self, repository: str, subject: BlobId) -> list[dict[str, Any]]:
        """The descriptors of the manifests of repository whose subject is subject, while
        they are still here."""
        found = []
        prefix = self._referrers_prefix(repository, subject)
        for info in self.store.list_records(REFERRERS_NAMESPACE, prefix):
            value = self.store.get_record(REFERRERS_NAMESPACE, info.key)
            referrer = BlobId(info.key[len(prefix) :], 0)
            if value is None or self.record(repository, referrer) is None:
                self.store.delete_record(REFERRERS_NAMESPACE, info.key)
                continue
            try:
                found.append(json.loads(value))
            except ValueError:
                continue
        return found

    def tags(self, repository: str) -> list[str]:
        prefix = f"{repository}:"
        return sorted(
            info.key[len(prefix) :] for info in self.store.list_records(TAGS_NAMESPACE, prefix)
        )


def _accepts(request: web.Request, media_type: str) -> bool:
    accept = request.headers.getall("Accept", [])
    types = [t.split(";")[0].strip() for header in accept for t in header.split(",")]
    types = [t for t in types if t]
    return not types or media_type in types or "*/*" in types or "application/*" in types


class OciRegistry(HttpFrontEnd):
    prefix = OCI_PREFIX
    scopes = {
        ("oci_base", "GET"): (),
        ("oci_token", "GET"): (),
        ("oci_blobs", "GET"): (READ,),
        ("oci_blobs", "HEAD"): (READ,),
        ("oci_uploads", "POST"): (CAS_WRITE,),
        ("oci_uploads", "GET"): (CAS_WRITE,),
        ("oci_uploads", "PATCH"): (CAS_WRITE,),
        ("oci_uploads", "PUT"): (CAS_WRITE,),
        ("oci_uploads", "DELETE"): (CAS_WRITE,),
        ("oci_manifests", "GET"): (READ,),
        ("oci_manifests", "HEAD"): (READ,),
        ("oci_manifests", "PUT"): (AC_WRITE,),
        ("oci_manifests", "DELETE"): (AC_WRITE,),
        ("oci_tags", "GET"): (READ,),
        ("oci_referrers", "GET"): (READ,),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.manifests = Manifests(self.store)
        self.uploads = open_upload_sessions(
            self.backend, self.options.upload_idle_timeout, self.options.upload_sessions_dir
        )
        upstreams = self.options.registry_upstreams
        auth_file = self.options.registry_upstream_auth_file
        self.upstreams = (
            Upstreams([parse_upstream(u) for u in upstreams], auth_file) if upstreams else None
        )
        self.tag_ttl = self.options.registry_tag_ttl
        self.fetching: dict[str, asyncio.Future[None]] = {}  # blob hash -> its upstream fetch
        self._sweeper: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self.uploads.close()
        if self.upstreams is not None:
            await self.upstreams.close()

    async def _sweep(self) -> None:
        """End idle sessions while uploads are open, even when no request comes to do it."""
        while True:
            await asyncio.sleep(min(60.0, self.uploads.idle_seconds / 2))
            if not await self.uploads.expire():
                break
        self._sweeper = None

    def upstream_of(self, repository: str) -> Upstream | None:
        return None if self.upstreams is None else self.upstreams.for_repository(repository)

    # ---- paths ----
    def check_segments(self, segments: list[str], shown: str) -> list[str]:
        if len(segments) > 0 and segments[-1] == "":
            segments = segments[:-1]  # "/v2/" and ".../blobs/uploads/"
        for seg in segments:
            if seg in ("", ".", "..") or not _SEGMENT.fullmatch(seg):
                raise _oci_error(
                    400,
                    "NAME_INVALID",
                    f"path {shown!r} is not valid: segments are letters, digits and _.~:- "
                    "(no empty, '.' or '..' segments, no percent-encoding)",
                )
        return segments

    def parse(self, segments: list[str], shown: str) -> Target:
        n = len(segments)
        if n == 0:
            return Target("oci_base", "", "")
        if segments == ["token"]:
            return Target("oci_token", "", "")
        if n >= 3 and segments[-2:] == ["blobs", "uploads"]:
            return Target("oci_uploads", _check_name(segments[:-2], shown), "")
        if n >= 4 and segments[-3:-1] == ["blobs", "uploads"]:
            if not _UPLOAD_ID.fullmatch(segments[-1]):
                raise _oci_error(404, "BLOB_UPLOAD_UNKNOWN", f"no upload {segments[-1][:40]!r}")
            return Target("oci_uploads", _check_name(segments[:-3], shown), segments[-1])
        if n >= 3 and segments[-2] == "blobs":
            name = _check_name(segments[:-2], shown)
            parse_digest(segments[-1])
            return Target("oci_blobs", name, segments[-1])
        if n >= 3 and segments[-2] == "manifests":
            name = _check_name(segments[:-2], shown)
            reference = segments[-1]
            if ":" in reference:
                parse_digest(reference)
            elif not _TAG.fullmatch(reference):
                raise _oci_error(
                    400, "TAG_INVALID", f"{reference[:80]!r} is neither a tag nor a digest"
                )
            return Target("oci_manifests", name, reference)
        if n >= 3 and segments[-2] == "referrers":
            name = _check_name(segments[:-2], shown)
            parse_digest(segments[-1])
            return Target("oci_referrers", name, segments[-1])
        if n >= 3 and segments[-2:] == ["tags", "list"]:
            return Target("oci_tags", _check_name(segments[:-2], shown), "")
        raise _oci_error(404, "NOT_FOUND", f"path {shown!r} is not a route of the OCI registry")

    # ---- the protocol's answers ----
    def refusal(
        self, request: web.Request, status: int, message: str, code: str | None
    ) -> web.Response:
        if status == 403 and code is None and not current_caller().authenticated:
            # The pipeline's refusal of an anonymous caller a scope: a client sends its
            # credentials on a 401 only.
            status, code = 401, "UNAUTHORIZED"
        error = {"code": code or _CODE_OF_STATUS.get(status, "UNKNOWN"), "message": message}
        return web.json_response({"errors": [error]}, status=status)

    def _missing(
        self, request: web.Request, code: str, message: str
    ) -> tuple[web.StreamResponse, bool]:
        """The answer to a lookup that missed (a miss in the metrics, not a failed call)."""
        return self.refusal(request, 404, message, code), False

    def challenge(self, request: web.Request) -> str:
        realm = f"{request.scheme}://{request.host}/{OCI_PREFIX}/token"
        return f'Bearer realm="{realm}",service="slipstream"'

    def audit(self, method: str, target: Target) -> dict[str, object] | None:
        if target.route == "oci_manifests" and method in ("PUT", "DELETE"):
            return {
                "event": f"oci_manifest_{method.lower()}",
                "repository": target.instance,
                "reference": target.key,
            }
        return None

    async def serve(
        self, request: web.Request, target: Target, limits: Any
    ) -> tuple[web.StreamResponse, bool | None]:
        route = target.route
        if route == "oci_base":
            return web.json_response(
                {}, headers={"Docker-Distribution-API-Version": "registry/2.0"}
            ), None
        if route == "oci_token":
            return self._token(request), None
        if route == "oci_blobs":
            return await self._blob(request, target)
        if route == "oci_uploads":
            return await self._upload(request, target, limits.max_blob_size), None
        if route == "oci_manifests":
            return await self._manifest(request, target)
        if route == "oci_referrers":
            return await self._referrers(request, target), None
        return await self._tags(request, target), None

    def _token(self, request: web.Request) -> web.Response:
        """The Docker token flow: the bearer token is the caller's own token (the password
        of its Basic credentials), checked by the pipeline already."""
        call = current_call()
        header = (call.metadata("authorization") if call is not None else None) or ""
        token = header.partition(" ")[2].strip()  # "Bearer TOKEN", Basic made so already
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return web.json_response(
            {"token": token, "access_token": token, "expires_in": 3600, "issued_at": now}
        )

    # ---- blobs ----
    async def _blob(self, request: web.Request, target: Target) -> tuple[web.StreamResponse, bool]:
        digest = target.key
        sha256 = parse_digest(digest).hash
        headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes"}
        found = await self.backend.run(self.store.find_blob, sha256)
        upstream = self.upstream_of(target.instance)
        if found is None and upstream is not None:
            if request.method == "HEAD":
                return await self._upstream_head(request, upstream, target, headers), False
            if "Range" not in request.headers:
                response = await self._fetch_blob(request, upstream, target, headers)
                if response is not None:
                    return response, False
            else:
                await self._fetch_blob(None, upstream, target, headers)
            found = await self.backend.run(self.store.find_blob, sha256)
        if found is None:
            return self._missing(request, "BLOB_UNKNOWN", f"no blob {digest}")
        if request.method == "HEAD":
            return await head(request, found.size, headers), True
        start, end = self._range(request.headers.get("Range"), found.size)
        if start == 0 and end == found.size:
            opened = await self.backend.run(open_blob, self.store, found)
            if opened is None:
                raise _oci_error(404, "BLOB_UNKNOWN", f"no blob {digest}")
            content = opened[1]
            if isinstance(content, bytes):
                return web.Response(
                    body=content, content_type="application/octet-stream", headers=headers
                ), True
            return await stream(self.backend, request, found, content, headers=headers), True
        chunks = await self.backend.run(self.store.read_blob, found, start, CHUNK)
        if chunks is None:
            raise _oci_error(404, "BLOB_UNKNOWN", f"no blob {digest}")
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{found.size}"
        response = await stream(
            self.backend,
            request,
            found,
            iter(chunks),
            length=end - start,
            status=206,
            headers=headers,
        )
        return response, True

    # ---- the pull-through mirror ----
    async def _upstream_head(
        self, request: web.Request, upstream: Upstream, target: Target, headers: dict[str, str]
    ) -> web.StreamResponse:
        assert self.upstreams is not None
        path = f"blobs/{target.key}"
        async with await self.upstreams.request("HEAD", upstream, target.instance, path) as answer:
            size = answer.content_length
            if answer.status == 404:
                raise _oci_error(404, "BLOB_UNKNOWN", f"no blob {target.key}, here or upstream")
            if answer.status != 200 or size is None:
                raise UpstreamUnavailable(upstream, f"it answered {answer.status} to HEAD")
        return await head(request, size, headers)

    async def _fetch_blob(
        self,
        request: web.Request | None,
        upstream: Upstream,
        target: Target,
        headers: dict[str, str],
    ) -> web.StreamResponse | None:
        """Fetch a blob from the upstream into the store, streaming it to request's client
        as it comes (if given), once however many ask at the same time: the others wait
        for it and are answered from the store (None)."""
        assert self.upstreams is not None
        sha256 = parse_digest(target.key).hash
        while (pending := self.fetching.get(sha256)) is not None:
            await asyncio.shield(pending)
            if await self.backend.run(self.store.find_blob, sha256) is not None:
                return None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.fetching[sha256] = done
        writer: BlobWriter | None = None
        try:
            answer = await self.upstreams.request(
                "GET", upstream, target.instance, f"blobs/{target.key}"
            )
            async with answer:
                size = answer.content_length
                if answer.status == 404:
                    raise _oci_error(404, "BLOB_UNKNOWN", f"no blob {target.key}, here or upstream")
                if answer.status != 200 or size is None:
                    raise UpstreamUnavailable(upstream, f"it answered {answer.status} for a blob")
                writer = await self.backend.run(self.store.open_writer, BlobId(sha256, size))
                response: web.StreamResponse | None = None
                if request is not None:
                    response = web.StreamResponse(status=200, headers=headers)
                    response.content_type = "application/octet-stream"
                    response.content_length = size
                    await response.prepare(request)
                try:
                    async for chunk in answer.content.iter_chunked(CHUNK):
                        await self.backend.run(writer.write, chunk)
                        if response is not None:
                            try:
                                await response.write(chunk)
                            except ConnectionError:
                                response = None  # the client left: store it for the others
                    await self.backend.run(writer.commit)
                except (TimeoutError, aiohttp.ClientError, DigestError) as exc:
                    if response is not None:
                        response.force_close()  # the body is cut short: the client sees it
                    raise UpstreamUnavailable(upstream, f"blob {target.key}: {exc}"[:300]) from None
                return response
        finally:
            if writer is not None:
                await self.backend.run(writer.abort)
            del self.fetching[sha256]
            done.set_result(None)

    async def _upstream_manifest(
        self, upstream: Upstream, repository: str, reference: str
    ) -> tuple[StoredManifest, bytes]:
        """Fetch a manifest by tag or digest from the upstream, check and store it."""
        assert self.upstreams is not None
        accept = {"Accept": ", ".join(MANIFEST_TYPES)}
        path = f"manifests/{reference}"
        async with await self.upstreams.request(
            "GET", upstream, repository, path, accept
        ) as answer:
            if answer.status == 404:
                raise _oci_error(
                    404,
                    "MANIFEST_UNKNOWN",
                    f"no manifest {reference} in {repository}, here or upstream",
                )
            if answer.status != 200:
                raise UpstreamUnavailable(upstream, f"it answered {answer.status} for a manifest")
            try:
                data = await answer.content.read(MAX_MANIFEST_SIZE + 1)
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise UpstreamUnavailable(upstream, f"{exc}"[:200]) from None
            content_type = answer.headers.get("Content-Type")
        if len(data) > MAX_MANIFEST_SIZE:
            raise UpstreamUnavailable(upstream, "its manifest is over 4 MiB")
        media_type, _ = manifest_media_type(data, content_type)
        tag = None if ":" in reference else reference
        if tag is None and parse_digest(reference).hash != hashlib.sha256(data).hexdigest():
            raise UpstreamUnavailable(upstream, f"it sent a manifest that is not {reference}")
        blob = await self.backend.run(
            self.manifests.put, repository, tag, media_type, data, time.time()
        )
        return StoredManifest(blob, media_type), data

    async def _mirrored_manifest(
        self, upstream: Upstream, repository: str, reference: str
    ) -> tuple[StoredManifest, bytes] | None:
        """A manifest of a mirrored repository: from the store while fresh, else from the
        upstream, else (the upstream unavailable) from the store however old."""
        complete = self.manifests.complete
        found = await self.backend.run(
            functools.partial(complete, repository, reference, mirrored=True, tag_ttl=self.tag_ttl)
        )
        if found is not None:
            return found
        try:
            return await self._upstream_manifest(upstream, repository, reference)
        except UpstreamUnavailable as exc:
            stale = await self.backend.run(
                functools.partial(complete, repository, reference, mirrored=True)
            )
            if stale is None:  # 404, not 502: clients show a 404's message
                raise _oci_error(
                    404, "MANIFEST_UNKNOWN", f"{repository}:{reference} is not cached here; {exc}"
                ) from None
            log.warning(
                "serving %s:%s as cached: its upstream is unavailable", repository, reference
            )
            return stale

    @staticmethod
    def _range(header: str | None, size: int) -> tuple[int, int]:
        """The [start, end) a Range header asks for (all of it without one); 416 past the end."""
        if header is None:
            return 0, size
        m = _RANGE.fullmatch(header.strip())
        if m is None or (not m.group(1) and not m.group(2)):
            raise _oci_error(416, "RANGE_INVALID", f"Range {header[:60]!r} is not bytes=START-END")
        if not m.group(1):  # the last N bytes
            start, end = max(0, size - int(m.group(2))), size
        else:
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
        if start >= size or start >= end:
            raise _oci_error(
                416, "RANGE_INVALID", f"Range {header[:60]!r} is past the end of {size} bytes"
            )
        return start, end

    # ---- uploads ----
    @staticmethod
    def _session_headers(repository: str, upload_id: str, size: int) -> dict[str, str]:
        return {
            "Location": f"/{OCI_PREFIX}/{repository}/blobs/uploads/{upload_id}",
            "Range": f"0-{max(0, size - 1)}",
            "Docker-Upload-UUID": upload_id,
        }

    def _created(self, repository: str, digest: str) -> web.Response:
        return web.Response(
            status=201,
            headers={
                "Location": f"/{OCI_PREFIX}/{repository}/blobs/{digest}",
                "Docker-Content-Digest": digest,
            },
        )

    async def _upload(
        self, request: web.Request, target: Target, limit: int | None
    ) -> web.Response:
        repository = target.instance
        owner = current_caller().name
        query = request.query
        await self.uploads.expire()
        if not target.key:  # POST: a new session, or all in one
            mount = query.get("mount")
            if mount is not None:
                blob = parse_digest(mount)
                if await self.backend.run(self.store.find_blob, blob.hash) is not None:
                    return self._created(repository, mount)
            digest = query.get("digest")
            if digest is not None:
                blob = parse_digest(digest)
                if request.content_length is not None:
                    await put_blob_body(
                        self.backend, request, blob.hash, limit, digest_code="DIGEST_INVALID"
                    )
                    return self._created(repository, digest)
            upload_id = await self.uploads.open(repository, owner)
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
            if digest is not None:  # chunked monolithic: through a session
                async with self.uploads.hold(upload_id, repository, owner) as session:
                    return await self._finish(request, session, digest, limit)
            return web.Response(status=202, headers=self._session_headers(repository, upload_id, 0))
        if request.method == "GET":
            size = await self.uploads.status(target.key, repository, owner)
            return web.Response(
                status=204, headers=self._session_headers(repository, target.key, size)
            )
        # One request at a time on a session, a DELETE too.
        async with self.uploads.hold(target.key, repository, owner) as session:
            if request.method == "DELETE":
                await session.end()
                return web.Response(status=204)
            if request.method == "PATCH":
                content_range = request.headers.get("Content-Range")
                if content_range is not None:
                    m = _CONTENT_RANGE.fullmatch(content_range.strip())
                    if m is None or int(m.group(1)) != session.size:
                        raise HttpError(
                            416,
                            f"Content-Range {content_range[:60]!r} does not start at "
                            f"{session.size}, where the upload is",
                            code="BLOB_UPLOAD_INVALID",
                            close=True,
                        )
                await self._append(request, session, limit)
                return web.Response(
                    status=202, headers=self._session_headers(repository, session.id, session.size)
                )
            digest = query.get("digest")
            if digest is None:
                raise _oci_error(400, "DIGEST_INVALID", "finishing an upload needs ?digest=")
            return await self._finish(request, session, digest, limit)

    async def _append(
        self, request: web.Request, session: UploadSession, limit: int | None
    ) -> None:
        left = None if limit is None else limit - session.size
        check_length(request, left, "the upload")
        try:
            async for chunk in body(request, left):
                await session.append(chunk)
        except BaseException:
            await session.end()  # its bytes are no longer what the client sent
            raise

    async def _finish(
        self, request: web.Request, session: UploadSession, digest: str, limit: int | None
    ) -> web.Response:
        expected = parse_digest(digest)
        await self._append(request, session, limit)
        await session.finish(expected.hash)
        return self._created(session.repository, digest)

    # ---- manifests ----
    async def _manifest(
        self, request: web.Request, target: Target
    ) -> tuple[web.StreamResponse, bool | None]:
        repository, reference = target.instance, target.key
        method = request.method
        if method == "PUT":
            if not self.backend.update_enabled:
                raise HttpError(
                    403, "registry updates are disabled (--read-only-ac)", code="DENIED"
                )
            return await self._put_manifest(request, repository, reference), None
        if method == "DELETE":
            if not self.backend.update_enabled:
                raise HttpError(
                    403, "registry updates are disabled (--read-only-ac)", code="DENIED"
                )
            if not await self.backend.run(self.manifests.delete, repository, reference):
                raise _oci_error(
                    404, "MANIFEST_UNKNOWN", f"no manifest {reference} in {repository}"
                )
            return web.Response(status=202), None
        upstream = self.upstream_of(repository)
        if upstream is not None:
            found = await self._mirrored_manifest(upstream, repository, reference)
        else:
            found = await self.backend.run(self.manifests.complete, repository, reference)
        if found is None:
            missing = f"no complete manifest {reference} in {repository}"
            return self._missing(request, "MANIFEST_UNKNOWN", missing)
        stored, data = found
        if not _accepts(request, stored.media_type):
            raise _oci_error(
                404,
                "MANIFEST_UNKNOWN",
                f"manifest {reference} is a {stored.media_type}, "
                "which the Accept header leaves out",
            )
        headers = {
            "Docker-Content-Digest": _digest_of(stored.blob),
            "Content-Type": stored.media_type,
        }
        if method == "HEAD":
            response = web.StreamResponse(status=200, headers=headers)
            response.content_length = len(data)
            await response.prepare(request)
            return response, True
        return web.Response(body=data, headers=headers), True

    async def _put_manifest(
        self, request: web.Request, repository: str, reference: str
    ) -> web.Response:
        check_length(request, MAX_MANIFEST_SIZE, "a manifest")
        length = request.content_length
        data = b"".join([c async for c in body(request, MAX_MANIFEST_SIZE)])
        if length is None and not data:
            raise _oci_error(400, "MANIFEST_INVALID", "the manifest is empty")
        media_type, manifest = manifest_media_type(data, request.headers.get("Content-Type"))
        tag = None
        if ":" in reference:
            if parse_digest(reference).hash != hashlib.sha256(data).hexdigest():
                raise _oci_error(
                    400, "DIGEST_INVALID", f"the manifest does not hash to {reference}"
                )
        else:
            tag = reference
        try:
            blobs, children = _referenced(manifest, media_type)
            for digest in blobs + children:
                parse_digest(digest)
        except ValueError as exc:
            raise _oci_error(400, "MANIFEST_INVALID", f"the manifest is not valid: {exc}") from None
        missing = await self.backend.run(self.manifests.missing, repository, blobs, children)
        if missing:
            raise _oci_error(
                400,
                "MANIFEST_BLOB_UNKNOWN",
                f"the manifest names {len(missing)} blob(s) not here, e.g. {missing[0]}",
            )
        subject = manifest.get("subject")
        subject_digest = _descriptor_digest(subject) if isinstance(subject, dict) else None
        if subject_digest is not None:
            parse_digest(subject_digest)  # the subject itself need not be here (spec)
        blob = await self.backend.run(self.manifests.put, repository, tag, media_type, data)
        digest = _digest_of(blob)
        headers = {
            "Location": f"/{OCI_PREFIX}/{repository}/manifests/{digest}",
            "Docker-Content-Digest": digest,
        }
        if subject_digest is not None:
            await self.backend.run(
                self.manifests.add_referrer, repository, subject_digest, blob, media_type, manifest
            )
            headers["OCI-Subject"] = subject_digest
        return web.Response(status=201, headers=headers)

    # ---- referrers ----
    async def _referrers(self, request: web.Request, target: Target) -> web.Response:
        subject = parse_digest(target.key)
        found = await self.backend.run(self.manifests.referrers, target.instance, subject)
        headers = {}
        artifact_type = request.query.get("artifactType")
        if artifact_type is not None:
            found = [d for d in found if d.get("artifactType") == artifact_type]
            headers["OCI-Filters-Applied"] = "artifactType"
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return web.Response(
            body=json.dumps(index).encode(), content_type=OCI_INDEX, headers=headers
        )

    # ---- tags ----
    async def _tags(self, request: web.Request, target: Target) -> web.Response:
        repository = target.instance
        n_text = request.query.get("n")
        last = request.query.get("last")
        if n_text is not None and (not n_text.isdigit() or len(n_text) > 9):
            raise _oci_error(400, "PAGINATION_NUMBER_INVALID", f"n={n_text[:20]!r} is not a number")
        n = min(int(n_text), MAX_TAGS_PAGE) if n_text is not None else MAX_TAGS_PAGE
        tags = await self.backend.run(self.manifests.tags, repository)
        if last is not None:
            tags = [t for t in tags if t > last]
        page = tags[:n]
        headers = {}
        if len(tags) > n and page:
            link = f"/{OCI_PREFIX}/{repository}/tags/list?n={n}&last={quote(page[-1])}"
            headers["Link"] = f'<{link}>; rel="next"'
        return web.json_response({"name": repository, "tags": page}, headers=headers)
