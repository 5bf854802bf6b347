"""zstd for the compressed-blobs resource names and compressed batch updates."""

from __future__ import annotations

import threading

import zstandard

from slipstream.core.digests import DigestError


def decompress_exact(data: bytes, size: int) -> bytes:
    """Decompress a zstd frame that must expand to exactly size bytes."""
    try:
        out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except zstandard.ZstdError as exc:
        raise DigestError(f"zstd data is not valid: {exc}") from None
    if len(out) != size:
        raise DigestError(f"zstd data expands to {len(out)} bytes, not {size}")
    return out


class StreamDecompressor:
    """Incremental zstd decoding that refuses to expand past a known size."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._produced = 0
        self._obj = zstandard.ZstdDecompressor().decompressobj()

    def feed(self, data: bytes | memoryview) -> bytes:
        try:
            out = self._obj.decompress(data)
        except zstandard.ZstdError as exc:
            raise DigestError(f"zstd data is not valid: {exc}") from None
        self._produced += len(out)
        if self._produced > self._size:
            raise DigestError(f"zstd data expands past the blob size {self._size}")
        return out


_local = threading.local()


def compress_blob(data: bytes | memoryview) -> bytes:
    """One zstd frame of data (a compressor per thread: they are not thread-safe)."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=1)
    return compressor.compress(data)


def compress_stream() -> zstandard.ZstdCompressionObj:
    return zstandard.ZstdCompressor(level=1).compressobj()
