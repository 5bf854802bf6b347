"""A store holding many small blobs and action results, for the restart and fleet benchmarks.

Blob i of a seed is a function of (seed, i): a client picks random indexes and computes
their digests, with no list of a million digests to ship around. Blob sizes cycle through
64-1,024 bytes. Action j's result names blobs 3j, 3j+1 and 3j+2 as its outputs.

Slipstream's disk store is filled through its own code (DiskStore.fill_blob and
put_record: the format and layout it reads back); BuildGrid's !disk-storage gets the same
payloads as plain files in its layout (cas/objects/<hash[:2]>/<hash[2:]>). Neither fill
syncs: the benchmarks time the servers, not the fill. A server that keeps its blobs in
memory (the reference server) is filled through the wire: BatchUpdateBlobs of the same
payloads (fill_over_grpc).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import time
from dataclasses import dataclass

import grpc

from slipstream.cache_server.services.action_cache import AC_NAMESPACE, action_key
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.disk_index import space_taken
from slipstream.core.digests import BlobId
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc

MIN_SIZE = 64
MAX_SIZE = 1024
OUTPUTS_PER_ACTION = 3


def blob_payload(seed: int, i: int) -> bytes:
    """The payload of blob i: 64-1,024 bytes, unique to (seed, i)."""
    head = b"fleet blob %d %d " % (seed, i)
    size = MIN_SIZE + (i * 7919) % (MAX_SIZE - MIN_SIZE + 1)
    return head + b"x" * (size - len(head))


def blob_digest(seed: int, i: int) -> re_pb2.Digest:
    data = blob_payload(seed, i)
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def action_digest(seed: int, j: int) -> re_pb2.Digest:
    """The digest of action j (the action itself is never stored)."""
    data = b"fleet action %d %d" % (seed, j)
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def action_result(seed: int, j: int, blobs: int) -> re_pb2.ActionResult:
    """Action j's result: exit 0, blobs 3j.. 3j+2 (modulo the fill) as its output files."""
    outputs = [(OUTPUTS_PER_ACTION * j + k) % blobs for k in range(OUTPUTS_PER_ACTION)]
    return re_pb2.ActionResult(
        exit_code=0,
        output_files=[
            re_pb2.OutputFile(path=f"out/{k}", digest=blob_digest(seed, i))
            for k, i in enumerate(outputs)
        ],
    )


@dataclass(frozen=True)
class Filled:
    """What a fill wrote: entries, the bytes the store counts for them (the space each
    file takes: whole filesystem blocks and a directory entry), and how long it took."""

    blobs: int
    actions: int
    entries: int
    bytes: int
    seconds: float
    blob_bytes: int  # of bytes, what the blobs take (the rest: the action results)


def fill_slipstream(root: pathlib.Path, blobs: int, actions: int, seed: int = 1) -> Filled:
    """Blobs 0..blobs-1 and results of actions 0..actions-1 in a disk store at root."""
    started = time.perf_counter()
    store = DiskStore(root, sync=False)
    header = 16  # disk.py's _HEADER: every file holds it before its payload
    block = store.block_size
    written = 0
    for i in range(blobs):
        data = blob_payload(seed, i)
        store.fill_blob(BlobId(hashlib.sha256(data).hexdigest(), len(data)), data)
        written += space_taken(header + len(data), block)
    blob_bytes = written
    for j in range(actions):
        key = action_key("", BlobId.from_proto(action_digest(seed, j)))
        value = action_result(seed, j, blobs).SerializeToString()
        store.put_record(AC_NAMESPACE, key, value)
        written += space_taken(header + len(value), block)
    store.close()
    seconds = time.perf_counter() - started
    return Filled(blobs, actions, blobs + actions, written, seconds, blob_bytes)


def fill_buildgrid(root: pathlib.Path, blobs: int, seed: int = 1) -> float:
    """The same blobs in BuildGrid's !disk-storage layout under root; returns seconds."""
    started = time.perf_counter()
    objects = root / "cas" / "objects"
    for shard in range(256):
        (objects / f"{shard:02x}").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    base = str(objects)
    for i in range(blobs):
        data = blob_payload(seed, i)
        digest = hashlib.sha256(data).hexdigest()
        fd = os.open(f"{base}/{digest[:2]}/{digest[2:]}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return time.perf_counter() - started


def fill_over_grpc(
    channel: grpc.Channel, blobs: int, seed: int = 1, batch_bytes: int = 2 << 20
) -> float:
    """Blobs 0..blobs-1 sent to the server on channel with BatchUpdateBlobs, about
    batch_bytes per call and a few calls in flight; returns seconds."""
    started = time.perf_counter()
    cas = re_grpc.ContentAddressableStorageStub(channel)
    in_flight: list[grpc.Future[re_pb2.BatchUpdateBlobsResponse]] = []
    request = re_pb2.BatchUpdateBlobsRequest()
    size = 0

    def sent(future: grpc.Future[re_pb2.BatchUpdateBlobsResponse]) -> None:
        if any(r.status.code != 0 for r in future.result(timeout=300).responses):
            raise RuntimeError("the server refused a blob of the fill")

    for i in range(blobs):
        data = blob_payload(seed, i)
        digest = re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        request.requests.add(digest=digest, data=data)
        size += len(data)
        if size >= batch_bytes or i == blobs - 1:
            in_flight.append(cas.BatchUpdateBlobs.future(request))
            request, size = re_pb2.BatchUpdateBlobsRequest(), 0
            if len(in_flight) >= 4:
                sent(in_flight.pop(0))
    for future in in_flight:
        sent(future)
    return time.perf_counter() - started
