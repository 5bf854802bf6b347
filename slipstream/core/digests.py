"""Content addresses: SHA-256 digests as the cache stores and checks them."""

from __future__ import annotations

import functools
import hashlib
import operator
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

from slipstream.protos import remote_execution_pb2 as re_pb2

_HEX64 = re.compile(r"[0-9a-f]{64}")


class DigestError(ValueError):
    """A digest that is malformed, or data that does not match its digest."""


class _BlobFields(NamedTuple):
    hash: str
    size: int


class BlobId(_BlobFields):
    """A validated SHA-256 content address: lowercase hex hash and exact size.

    A tuple underneath: hashing, equality and ordering run in C, which matters
    on paths that handle thousands of digests per call.
    """

    __slots__ = ()

    def __new__(cls, hash: str, size: int) -> BlobId:
        if not _HEX64.fullmatch(hash):
            raise DigestError(f"digest hash {hash[:80]!r} is not 64 lowercase hex digits")
        if size < 0:
            raise DigestError(f"digest size {size} is negative")
        return tuple.__new__(cls, (hash, size))

    @classmethod
    def of(cls, data: bytes) -> BlobId:
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    @classmethod
    def from_proto(cls, digest: re_pb2.Digest) -> BlobId:
        return cls(digest.hash, digest.size_bytes)

    @classmethod
    def from_protos(cls, digests: Iterable[re_pb2.Digest]) -> list[BlobId]:
        """BlobIds of many digests, checked in bulk; DigestError names the first bad one."""
        pairs = list(map(_HASH_AND_SIZE, digests))
        if not pairs:
            return []
        hashes, sizes = zip(*pairs, strict=True)
        joined = "".join(hashes)
        # Bulk checks in C: every hash 64 characters, all of them hex, none uppercase.
        try:
            valid = (
                set(map(len, hashes)) == {64}
                and len(bytes.fromhex(joined)) * 2 == len(joined)
                and joined.lower() == joined
                and min(sizes) >= 0
            )
        except ValueError:
            valid = False
        if not valid:
            return [cls(h, s) for h, s in pairs]  # raises for the first bad digest
        return list(map(_new_blob_id, pairs))

    def to_proto(self) -> re_pb2.Digest:
        return re_pb2.Digest(hash=self.hash, size_bytes=self.size)

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"


_HASH_AND_SIZE = operator.attrgetter("hash", "size_bytes")
# Builds a BlobId from an already checked (hash, size) pair, skipping __new__.
_new_blob_id: Callable[[tuple[str, int]], BlobId] = functools.partial(tuple.__new__, BlobId)  # type: ignore[assignment]

EMPTY_BLOB = BlobId.of(b"")


def verify(data: bytes, expected: BlobId) -> None:
    """Raise DigestError unless data is exactly the blob that expected names."""
    if len(data) != expected.size:
        raise DigestError(f"blob {expected} has {len(data)} bytes, not {expected.size}")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.hash:
        raise DigestError(f"blob {expected} hashes to {actual}")


def check_digest_function(value: int) -> None:
    """Accept SHA256 or UNKNOWN (clients that predate the field); refuse the rest."""
    if value not in (re_pb2.DigestFunction.UNKNOWN, re_pb2.DigestFunction.SHA256):
        known = value in re_pb2.DigestFunction.Value.values()
        name = re_pb2.DigestFunction.Value.Name(value) if known else str(value)  # type: ignore[arg-type]
        raise DigestError(f"digest function {name} is not supported; this server uses SHA256")
