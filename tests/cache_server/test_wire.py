"""Messages encoded and decoded without protobuf hold to protobuf's answers."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from slipstream.cache_server.wire import (
    BatchReadResponseEncoder,
    WireError,
    encode_read_response,
    parse_write_request,
)
from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import status_pb2

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _by_protobuf(raw: bytes) -> tuple[str, int, bool, bytes] | str:
    try:
        m = bs_pb2.WriteRequest.FromString(raw)
    except Exception:
        return "refused"
    return m.resource_name, m.write_offset, m.finish_write, m.data


def _by_us(raw: bytes) -> tuple[str, int, bool, bytes] | str:
    try:
        c = parse_write_request(raw)
    except WireError:
        return "refused"
    return c.resource_name, c.write_offset, c.finish_write, bytes(c.data)


write_requests = st.builds(
    bs_pb2.WriteRequest,
    resource_name=st.text(max_size=40),
    write_offset=_INT64,
    finish_write=st.booleans(),
    data=st.binary(max_size=300),
)
# Other messages' fields stand for fields a WriteRequest does not know, or knows
# under another wire type (ReadRequest's field 3 is an int64, WriteRequest's a bool).
foreign = st.one_of(
    st.builds(bs_pb2.ReadRequest, resource_name=st.text(max_size=10), read_limit=_INT64),
    st.builds(bs_pb2.QueryWriteStatusResponse, committed_size=_INT64, complete=st.booleans()),
)


@settings(max_examples=400, deadline=None)
@given(write_requests)
def test_write_requests_round_trip(message: bs_pb2.WriteRequest) -> None:
    raw = message.SerializeToString()
    chunk = parse_write_request(raw)
    assert (chunk.resource_name, chunk.write_offset, chunk.finish_write, bytes(chunk.data)) == (
        message.resource_name,
        message.write_offset,
        message.finish_write,
        message.data,
    )


@settings(max_examples=600, deadline=None)
@given(
    st.lists(st.one_of(write_requests, foreign), max_size=4),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=3),
    st.binary(max_size=12),
)
@example([], [], bytes.fromhex("0b000c0c"))  # an unknown group, with a field 0 inside it
@example([], [], bytes.fromhex("0b000c"))  # the same group, not ended
@example([], [], bytes.fromhex("f8ffffff0f01"))  # the highest field number there is
@example([], [], bytes.fromhex("808080801001"))  # a tag over 32 bits
@example([], [], bytes.fromhex("0a02c328"))  # a resource name that is not UTF-8
@example([], [], bytes.fromhex("52050102"))  # data shorter than its length
@example([], [], bytes.fromhex("10ffffffffffffffffff01"))  # a ten-byte varint
@example([], [], bytes.fromhex("10ffffffffffffffffffff01"))  # an eleven-byte one
def test_any_bytes_decode_as_protobuf_decodes_them(
    messages: list[object], flips: list[tuple[int, int]], tail: bytes
) -> None:
    """Messages run together (later fields win), damaged, or followed by garbage: the
    same fields, or refused, exactly as protobuf's decoder answers."""
    raw = bytearray(b"".join(m.SerializeToString() for m in messages) + tail)  # type: ignore[attr-defined]
    for at, value in flips:
        if raw:
            raw[at % len(raw)] = value
    assert _by_us(bytes(raw)) == _by_protobuf(bytes(raw))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.integers(0, 300_000).map(bytes)))
def test_read_responses_encode_as_protobuf_encodes_them(data: bytes) -> None:
    encoded = encode_read_response(data)
    assert encoded == bs_pb2.ReadResponse(data=data).SerializeToString()
    assert bs_pb2.ReadResponse.FromString(encoded).data == data


_HASHES = st.text("0123456789abcdef", min_size=64, max_size=64)
_SIZES = st.one_of(st.integers(0, 300), st.integers(0, 2**63 - 1))
batch_entries = st.lists(
    st.one_of(
        st.tuples(_HASHES, _SIZES, st.binary(max_size=300), st.sampled_from([0, 1, 2])),
        st.tuples(_HASHES, _SIZES, st.integers(1, 16), st.text(max_size=30)),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(batch_entries, st.booleans())
def test_batch_read_responses_encode_as_protobuf_encodes_them(
    entries: list[tuple[str, int, bytes | int, int | str]], as_views: bool
) -> None:
    encoder = BatchReadResponseEncoder()
    expected = re_pb2.BatchReadBlobsResponse()
    for hash_, size, data_or_code, compressor_or_message in entries:
        entry = expected.responses.add()
        entry.digest.hash, entry.digest.size_bytes = hash_, size
        if isinstance(data_or_code, bytes):
            assert isinstance(compressor_or_message, int)
            entry.data = data_or_code
            entry.compressor = re_pb2.Compressor.Value.ValueType(compressor_or_message)
            entry.status.SetInParent()  # OK, stated
            data = memoryview(data_or_code) if as_views else data_or_code
            encoder.add_data(hash_, size, data, compressor_or_message)
        else:
            entry.status.code = data_or_code
            entry.status.message = str(compressor_or_message)
            status = status_pb2.Status(code=data_or_code, message=str(compressor_or_message))
            encoder.add_status(hash_, size, status.SerializeToString())
    encoded = encoder.encode()
    assert encoded.message == expected.SerializeToString()
    assert re_pb2.BatchReadBlobsResponse.FromString(encoded.message) == expected
    found = sum(isinstance(e[2], bytes) for e in entries)
    assert (encoded.found, encoded.not_found) == (found, len(entries) - found)
