"""Content addresses: SHA-256 digests as the cache stores and checks them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from slipstream_protos import remote_execution_pb2 as re_pb2

_HEX64 = re.compile(r"[0-9a-f]{64}")


class DigestError(ValueError):
    """A digest that is malformed, or data that does not match its digest."""


@dataclass(frozen=True, slots=True, order=True)
class BlobId:
    """A validated SHA-256 content address: lowercase hex hash and exact size."""

    hash: str
    size: int

    def __post_init__(self) -> None:
        if not _HEX64.fullmatch(self.hash):
            raise DigestError(f"digest hash {self.hash[:80]!r} is not 64 lowercase hex digits")
        if self.size < 0:
            raise DigestError(f"digest size {self.size} is negative")

    @classmethod
    def of(cls, data: bytes) -> BlobId:
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    @classmethod
    def from_proto(cls, digest: re_pb2.Digest) -> BlobId:
        return cls(digest.hash, digest.size_bytes)

    def to_proto(self) -> re_pb2.Digest:
        return re_pb2.Digest(hash=self.hash, size_bytes=self.size)

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"


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
