"""What a GetLayer with many restore prefixes may cost a real server (only `read` needed)."""

from __future__ import annotations

import time

import grpc
import pytest

from slipstream.cache_server.services.layers import MAX_RESTORE_PREFIXES
from slipstream.protos import layers_pb2, layers_pb2_grpc
from tests.support.reapi import digest

LAYERS = 200
EMPTY = digest(b"")  # the empty Directory: a complete tree of nothing


@pytest.fixture
def layers(channel: grpc.Channel) -> layers_pb2_grpc.LayersStub:
    stub = layers_pb2_grpc.LayersStub(channel)
    for i in range(LAYERS):
        stub.PutLayer(layers_pb2.PutLayerRequest(key=f"deps-{i:03d}", root_digest=EMPTY))
    return stub


def test_thousands_of_prefixes_are_refused_at_once(layers: layers_pb2_grpc.LayersStub) -> None:
    prefixes = [f"no-such-layer-prefix-{i:010d}" for i in range(5000)]  # ~160 KB
    request = layers_pb2.GetLayerRequest(key="deps-new", restore_prefixes=prefixes)
    assert request.ByteSize() > 150_000
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        layers.GetLayer(request, timeout=10)
    took = time.monotonic() - started
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value.details()) == (
        f"5000 restore prefixes; at most {MAX_RESTORE_PREFIXES} are allowed"
    )
    assert took < 1.0, f"took {took:.2f}s"


def test_the_most_prefixes_allowed_cost_one_listing(layers: layers_pb2_grpc.LayersStub) -> None:
    misses = [f"deps-{i:03d}-x" for i in range(MAX_RESTORE_PREFIXES - 2)]
    prefixes = [*misses, "deps-1", "deps-"]
    started = time.monotonic()
    for _ in range(10):
        hit = layers.GetLayer(layers_pb2.GetLayerRequest(key="new", restore_prefixes=prefixes))
    took = (time.monotonic() - started) / 10
    # The newest layer under the first prefix that has one; prefixes in order.
    assert (hit.key, hit.exact) == ("deps-199", False)
    assert took < 0.25, f"{took:.3f}s per lookup"
