"""Messages on the wire without protobuf's copies of their data.

Protobuf copies a message's bytes field when the message is built or parsed and
again when it is serialized or the field is read: two copies of every byte of a
1 MiB chunk, on the event loop, a large share of the server's CPU on big reads
and writes, and of a batch read's. These read and write the few fields of
ByteStream's ReadResponse and WriteRequest, and CAS's BatchReadBlobsResponse,
themselves.

`parse_write_request` decodes what protobuf's decoder decodes, to the same values
(a property test holds it to that): a field given twice keeps its last value,
fields it does not know are skipped, and a field of the wrong wire type is
skipped as unknown, as protobuf does. What protobuf refuses (a truncated field, a
varint over ten bytes, a group that does not end, a resource name that is not
UTF-8) raises WireError. Its data is a view into the message as received.

`encode_read_response` and `BatchReadResponseEncoder` give the bytes protobuf would
serialize their messages to.
"""

from __future__ import annotations

from dataclasses import dataclass

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5

# WriteRequest's fields, and ReadResponse's one (google/bytestream/bytestream.proto)
_RESOURCE_NAME, _WRITE_OFFSET, _FINISH_WRITE, _DATA = 1, 2, 3, 10
_READ_DATA_TAG = bytes([_DATA << 3 | 2])  # ReadResponse.data is field 10 too

_EMPTY = memoryview(b"")


class WireError(ValueError):
    """Bytes that are not a valid WriteRequest."""


@dataclass(slots=True)
class WriteChunk:
    """One WriteRequest, with the fields the Write handler reads."""

    resource_name: str = ""
    write_offset: int = 0
    finish_write: bool = False
    data: memoryview = _EMPTY  # a view into the received message: no copy


def _tag(buf: bytes, pos: int, in_group: bool = False) -> tuple[int, int, int]:
    """(field number, wire type, position after) of the tag at pos."""
    tag, pos = _varint(buf, pos)
    if tag > 0xFFFF_FFFF:
        raise WireError("tag longer than 32 bits")
    if tag >> 3 == 0 and not in_group:  # protobuf lets field 0 pass inside a group
        raise WireError("field number 0")
    return tag >> 3, tag & 7, pos


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at pos, and the position after it."""
    value = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than ten bytes")


def parse_write_request(raw: bytes) -> WriteChunk:
    """The WriteRequest that raw encodes; WireError if protobuf would refuse it."""
    chunk = WriteChunk()
    view = memoryview(raw)
    pos = 0
    end = len(raw)
    while pos < end:
        field, wire, pos = _tag(raw, pos)
        if wire == _VARINT:
            value, pos = _varint(raw, pos)
            if field == _WRITE_OFFSET:
                chunk.write_offset = value - (1 << 64) if value >> 63 else value
            elif field == _FINISH_WRITE:
                chunk.finish_write = value != 0
        elif wire == _LEN:
            size, pos = _varint(raw, pos)
            stop = pos + size
            if stop > end:
                raise WireError("truncated length-delimited field")
            if field == _DATA:
                chunk.data = view[pos:stop]
            elif field == _RESOURCE_NAME:
                try:
                    chunk.resource_name = str(view[pos:stop], "utf-8")
                except UnicodeDecodeError:
                    raise WireError("resource_name is not valid UTF-8") from None
            pos = stop
        else:
            pos = _skip(raw, pos, field, wire)
    return chunk


def _skip(raw: bytes, pos: int, field: int, wire: int) -> int:
    """The position after an unknown field's value (a group's, through its end)."""
    if wire == _VARINT:
        return _varint(raw, pos)[1]
    if wire == _LEN:
        size, pos = _varint(raw, pos)
        pos += size
    elif wire == _I64:
        pos += 8
    elif wire == _I32:
        pos += 4
    elif wire == _SGROUP:
        while True:
            if pos >= len(raw):
                raise WireError("group without its end")
            inner, inner_wire, pos = _tag(raw, pos, in_group=True)
            if inner_wire == _EGROUP:
                if inner != field:
                    raise WireError("group ends with another field's number")
                return pos
            pos = _skip(raw, pos, inner, inner_wire)
    else:
        raise WireError("end of a group that was not started")
    if pos > len(raw):
        raise WireError("truncated field")
    return pos


def encode_read_response(data: bytes | memoryview) -> bytes:
    """ReadResponse(data=data), serialized: one copy of data, not two."""
    if not data:
        return b""  # proto3 leaves an empty field out
    return b"".join((_READ_DATA_TAG, _varint_bytes(len(data)), data))


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint_bytes(value: int) -> bytes:
    """A non-negative value as a varint."""
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# BatchReadBlobsResponse (remote_execution.proto): responses = 1; in each Response,
# digest = 1, data = 2, status = 3, compressor = 4; in a Digest, hash = 1,
# size_bytes = 2. Fields go in number order, as protobuf writes them.
_RESPONSE, _DIGEST, _BLOB_DATA, _STATUS, _COMPRESSOR = b"\x0a", b"\x0a", b"\x12", b"\x1a", b"\x20"
_HASH, _SIZE = b"\x0a", b"\x10"
_OK = _STATUS + b"\x00"  # an OK status is stated, as an empty message


@dataclass(frozen=True, slots=True)
class EncodedBatchRead:
    """A serialized BatchReadBlobsResponse, and how many of its entries carry data."""

    message: bytes
    found: int
    not_found: int  # entries with a status instead


class BatchReadResponseEncoder:
    """A BatchReadBlobsResponse, serialized as its entries are added: each blob's data
    is copied once, into the encoded message (protobuf copies it into the message, then
    again into a buffer it grows as it serializes)."""

    def __init__(self) -> None:
        self._pieces: list[bytes | memoryview] = []
        self._found = self._not_found = 0

    def add_data(self, hash_: str, size: int, data: bytes | memoryview, compressor: int) -> None:
        """An entry with the blob's data (compressed by compressor) and an OK status."""
        head = _digest_field(hash_, size)
        if data:
            head += _BLOB_DATA + _varint_bytes(len(data))
        tail = _OK + _COMPRESSOR + _varint_bytes(compressor) if compressor else _OK
        length = len(head) + len(data) + len(tail)
        self._pieces += (_RESPONSE + _varint_bytes(length) + head, data, tail)
        self._found += 1

    def add_status(self, hash_: str, size: int, status: bytes) -> None:
        """An entry with no data, and status (a serialized google.rpc.Status)."""
        entry = _digest_field(hash_, size) + _STATUS + _varint_bytes(len(status)) + status
        self._pieces.append(_RESPONSE + _varint_bytes(len(entry)) + entry)
        self._not_found += 1

    def encode(self) -> EncodedBatchRead:
        return EncodedBatchRead(b"".join(self._pieces), self._found, self._not_found)


def batch_read_message(response: EncodedBatchRead) -> bytes:
    """The response serializer of a BatchReadBlobs that answers encoded."""
    return response.message


def _digest_field(hash_: str, size: int) -> bytes:
    name = hash_.encode()
    digest = _HASH + _varint_bytes(len(name)) + name
    if size:
        digest += _SIZE + _varint_bytes(size)
    return _DIGEST + _varint_bytes(len(digest)) + digest
