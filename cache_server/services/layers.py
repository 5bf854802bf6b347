"""Layers: named directory trees in the CAS (key -> root Directory digest).

Records live in the store's "layers" namespace. Each value is a small JSON
document with the root digest and the server time of creation, so "newest" is
decided by one clock (the server's) whatever the clients' clocks say.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import grpc

from slipstream.cache_server.services.cas import collect_tree
from slipstream.cache_server.services.common import (
    Backend,
    RpcError,
    blob_from_request,
    grpc_errors,
)
from slipstream.cache_server.storage.base import Store
from slipstream.core.digests import BlobId, DigestError
from slipstream.protos import layers_pb2
from slipstream.protos import layers_pb2_grpc as layers_grpc

NAMESPACE = "layers"
# Restore prefixes one GetLayer may give: a lookup reads the layers under them once,
# whatever their number, but each prefix is still matched against every one.
MAX_RESTORE_PREFIXES = 32
# Candidate layers checked for completeness (each a walk of its tree) per lookup.
MAX_TREE_CHECKS = 16


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """What a layer key maps to."""

    root: BlobId
    created: float  # seconds since the epoch, server time

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"root": self.root.hash, "size": self.root.size, "created": self.created},
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LayerRecord:
        try:
            doc = json.loads(data)
            return cls(BlobId(doc["root"], int(doc["size"])), float(doc["created"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise DigestError(f"layer record does not parse: {exc}") from None


def missing_from_tree(store: Store, root: BlobId) -> int | None:
    """How many blobs of the tree under root the store lacks; None if root itself is missing."""
    directories = collect_tree(store, root)
    if directories is None:
        return None
    wanted: set[BlobId] = set()
    for directory in directories:
        # Subdirectories count too: collect_tree leaves out the missing ones.
        wanted.update(BlobId.from_proto(child.digest) for child in directory.directories)
        wanted.update(BlobId.from_proto(file.digest) for file in directory.files)
    return len(store.find_missing(sorted(wanted)))


class LayersService(layers_grpc.LayersServicer):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @grpc_errors
    async def PutLayer(
        self, request: layers_pb2.PutLayerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> layers_pb2.PutLayerResponse:
        root = blob_from_request(request.root_digest, "root_digest")
        missing = await self.backend.run(missing_from_tree, self.backend.store, root)
        if missing is None:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION, f"root directory {root} is not in the CAS"
            )
        if missing:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{missing} blobs of the tree under {root} are not in the CAS; upload them first",
            )
        record = LayerRecord(root, time.time())
        store = self.backend.store
        existed = await self.backend.run(store.get_record, NAMESPACE, request.key) is not None
        stored = await self.backend.run(
            lambda: store.put_record(
                NAMESPACE, request.key, record.to_bytes(), overwrite=request.overwrite
            )
        )
        if not stored:
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"layer {request.key!r} already exists; overwrite it explicitly",
            )
        return layers_pb2.PutLayerResponse(replaced=existed, created=record.created)

    @grpc_errors
    async def GetLayer(
        self, request: layers_pb2.GetLayerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> layers_pb2.GetLayerResponse:
        if len(request.restore_prefixes) > MAX_RESTORE_PREFIXES:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.restore_prefixes)} restore prefixes; at most "
                f"{MAX_RESTORE_PREFIXES} are allowed",
            )
        if any(not p for p in request.restore_prefixes):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "restore prefixes must not be empty")
        hit = await self.backend.run(self._lookup, request.key, list(request.restore_prefixes))
        if hit is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no layer for key {request.key!r}")
        key, record = hit
        return layers_pb2.GetLayerResponse(
            key=key,
            root_digest=record.root.to_proto(),
            exact=key == request.key,
            created=record.created,
        )

    def _lookup(self, key: str, prefixes: list[str]) -> tuple[str, LayerRecord] | None:
        """The exact key, else the newest entry under each prefix in turn.

        Only complete layers count: one whose blobs were evicted is passed
        over, so the client falls back to an older layer or a clean miss
        instead of a restore that fails halfway. The layers under the prefixes
        are listed and read once (under their longest common prefix), and each
        is checked for completeness at most once, at most MAX_TREE_CHECKS of them.
        """
        store = self.backend.store
        checked: dict[str, bool] = {}

        def complete(name: str, record: LayerRecord) -> bool:
            if name not in checked:
                if len(checked) >= MAX_TREE_CHECKS:
                    return False
                checked[name] = missing_from_tree(store, record.root) == 0
            return checked[name]

        data = store.get_record(NAMESPACE, key)
        if data is not None:
            record = LayerRecord.from_bytes(data)
            if complete(key, record):
                return key, record
        if not prefixes:
            return None
        common = os.path.commonprefix(prefixes)  # noqa: RUF071 - keys, not paths
        candidates: list[tuple[str, LayerRecord]] = []
        for info in store.list_records(NAMESPACE, common):
            if not info.key.startswith(tuple(prefixes)):
                continue
            value = store.get_record(NAMESPACE, info.key)
            if value is not None:  # deleted since the listing
                candidates.append((info.key, LayerRecord.from_bytes(value)))
        candidates.sort(key=lambda kr: (kr[1].created, kr[0]), reverse=True)
        for prefix in prefixes:
            for name, record in candidates:
                if name.startswith(prefix) and complete(name, record):
                    return name, record
        return None
