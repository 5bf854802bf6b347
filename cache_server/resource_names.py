"""ByteStream resource names: the pure parsing of what a Read or Write refers to.

    read:   {instance/}blobs/{hash}/{size}
            {instance/}compressed-blobs/zstd/{hash}/{size}
    write:  {instance/}uploads/{uuid}/blobs/{hash}/{size}{/metadata...}
            {instance/}uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}{/metadata...}

An instance name may have several segments, none of them a keyword.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slipstream.core.digests import BlobId, DigestError

RESERVED_SEGMENTS = frozenset(
    {
        "blobs",
        "uploads",
        "actions",
        "actionResults",
        "operations",
        "capabilities",
        "compressed-blobs",
    }
)
_SIZE = re.compile(r"[0-9]{1,19}")
_UPLOAD_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_OTHER_DIGEST_FUNCTIONS = frozenset(
    {"sha256tree", "blake3", "sha1", "md5", "sha384", "sha512", "vso", "murmur3"}
)


class ResourceNameError(DigestError):
    """A resource name that does not parse or names something unsupported."""


@dataclass(frozen=True, slots=True)
class ResourceName:
    instance: str
    blob: BlobId
    compressed: bool  # zstd
    upload_id: str | None = None


def _instance(segments: list[str], name: str) -> str:
    for s in segments:
        if s in ("", ".", "..") or s in RESERVED_SEGMENTS:
            raise ResourceNameError(
                f"resource name {name[:200]!r} has a bad instance segment {s!r}"
            )
    return "/".join(segments)


def _blob_part(parts: list[str], name: str) -> tuple[bool, BlobId, list[str]]:
    """Parse `blobs/H/S...` or `compressed-blobs/zstd/H/S...`; returns the rest."""
    compressed = parts[0] == "compressed-blobs"
    rest = parts[1:]
    if compressed:
        if not rest or rest[0] != "zstd":
            got = rest[0] if rest else ""
            raise ResourceNameError(f"compressor {got!r} is not supported (only zstd)")
        rest = rest[1:]
    if rest and rest[0] in _OTHER_DIGEST_FUNCTIONS:
        raise ResourceNameError(
            f"digest function {rest[0]} is not supported; this server uses SHA256"
        )
    if len(rest) < 2:
        raise ResourceNameError(f"resource name {name[:200]!r} lacks a hash and size")
    hash_, size = rest[0], rest[1]
    if not _SIZE.fullmatch(size):
        raise ResourceNameError(f"resource name {name[:200]!r} has a bad size {size[:30]!r}")
    return compressed, BlobId(hash_, int(size)), rest[2:]


def parse_read_name(name: str) -> ResourceName:
    parts = name.split("/")
    for i, part in enumerate(parts):
        if part in ("blobs", "compressed-blobs"):
            compressed, blob, rest = _blob_part(parts[i:], name)
            if rest:
                raise ResourceNameError(f"resource name {name[:200]!r} has trailing segments")
            return ResourceName(_instance(parts[:i], name), blob, compressed)
        if part in RESERVED_SEGMENTS:
            break
    raise ResourceNameError(
        f"{name[:200]!r} is not a read resource name ({{instance/}}blobs/HASH/SIZE)"
    )


def parse_write_name(name: str) -> ResourceName:
    parts = name.split("/")
    for i, part in enumerate(parts):
        if part == "uploads":
            if len(parts) < i + 3 or not _UPLOAD_ID.fullmatch(parts[i + 1]):
                raise ResourceNameError(f"resource name {name[:200]!r} lacks a valid upload id")
            if parts[i + 2] not in ("blobs", "compressed-blobs"):
                raise ResourceNameError(
                    f"resource name {name[:200]!r} lacks blobs/ after the upload id"
                )
            compressed, blob, _metadata = _blob_part(parts[i + 2 :], name)
            return ResourceName(_instance(parts[:i], name), blob, compressed, parts[i + 1])
        if part in RESERVED_SEGMENTS:
            break
    raise ResourceNameError(
        f"{name[:200]!r} is not a write resource name ({{instance/}}uploads/UUID/blobs/HASH/SIZE)"
    )
