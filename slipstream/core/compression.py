"""zstd for the compressed-blobs resource names and compressed batch updates."""

from __future__ import annotations

import threading

import zstandard

from slipstream.core.digests import DigestError


def decompress_exact(data: bytes | memoryview, size: int) -> bytes:
    """Decompress zstd data that must expand to exactly size bytes.

    Decoding stops (DigestError) as soon as the output passes size: a small
    payload that expands to gigabytes costs no more than size bytes of memory.
    """
    decompressor = StreamDecompressor(size)
    out = decompressor.feed(data)
    if len(out) != size:
        raise DigestError(f"zstd data expands to {len(out)} bytes, not {size}")
    return out


class _CappedSink:
    """Where zstd writes its output, in pieces of at most ~128 KiB: refuses the
    piece that would take the total past the cap, before it is kept."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.total = 0
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        if self.total + len(data) > self.cap:
            raise DigestError(f"zstd data expands past the blob size {self.cap}")
        self.total += len(data)
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        parts, self.parts = self.parts, []
        return parts[0] if len(parts) == 1 else b"".join(parts)


class StreamDecompressor:
    """Incremental zstd decoding that refuses to expand past a known size.

    The output is checked piece by piece as zstd produces it, so what is held
    never exceeds the size (plus one piece), however far the input would expand.
    """

    def __init__(self, size: int) -> None:
        self._sink = _CappedSink(size)
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            self._sink,  # type: ignore[arg-type]  # zstd calls only write()
            write_return_read=True,
        )

    def feed(self, data: bytes | memoryview) -> bytes:
        try:
            self._writer.write(data)
        except zstandard.ZstdError as exc:
            self._sink.parts.clear()
            raise DigestError(f"zstd data is not valid: {exc}") from None
        except DigestError:
            self._sink.parts.clear()
            raise
        return self._sink.take()


_local = threading.local()


def compress_blob(data: bytes | memoryview) -> bytes:
    """One zstd frame of data (a compressor per thread: they are not thread-safe)."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=1)
    return compressor.compress(data)


def compress_stream() -> zstandard.ZstdCompressionObj:
    return zstandard.ZstdCompressor(level=1).compressobj()
