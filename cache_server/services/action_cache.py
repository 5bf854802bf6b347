"""ActionCache: action results, served only while every blob they name is in the CAS."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from slipstream.cache_server.services.common import (
    MAX_BATCH_TOTAL_SIZE,
    Backend,
    RpcError,
    blob_from_request,
    check_function,
    grpc_errors,
    instance_ok,
)
from slipstream.cache_server.storage.base import Store
from slipstream.core.digests import EMPTY_BLOB, BlobId, DigestError
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc

AC_NAMESPACE = "ac"
INLINE_LIMIT = 1024 * 1024


def action_key(instance_name: str, action: BlobId) -> str:
    """Results are kept per instance: instances separate platforms and configurations."""
    return f"{instance_name}/{action.hash}" if instance_name else action.hash


def _present(digest: re_pb2.Digest) -> bool:
    return bool(digest.hash)


def referenced_blobs(store: Store, result: re_pb2.ActionResult) -> list[BlobId] | None:
    """Every CAS blob the result needs: outputs, trees and their files, stdout/stderr.

    None when a tree the result names is itself missing or unreadable.
    """
    blobs: list[BlobId] = []

    def add(digests: Iterable[re_pb2.Digest]) -> None:
        for d in digests:
            if _present(d):
                blobs.append(BlobId.from_proto(d))

    add(f.digest for f in result.output_files)
    add(d for d in (result.stdout_digest, result.stderr_digest) if _present(d))
    for out_dir in result.output_directories:
        if _present(out_dir.root_directory_digest):
            blobs.append(BlobId.from_proto(out_dir.root_directory_digest))
        tree_id = BlobId.from_proto(out_dir.tree_digest)
        data = store.get_blob(tree_id)
        if data is None:
            return None
        tree = re_pb2.Tree()
        try:
            tree.ParseFromString(data)
        except DecodeError:
            return None
        for directory in (tree.root, *tree.children):
            add(f.digest for f in directory.files)
    return blobs


class ActionCacheService(re_grpc.ActionCacheServicer):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @grpc_errors
    async def GetActionResult(
        self, request: re_pb2.GetActionResultRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> re_pb2.ActionResult:
        instance = instance_ok(request.instance_name)
        check_function(request.digest_function)
        action = blob_from_request(request.action_digest, "action_digest")
        return await self.backend.run_store(self._get, instance, action, request)

    def _get(
        self, instance: str, action: BlobId, request: re_pb2.GetActionResultRequest
    ) -> re_pb2.ActionResult:
        store = self.backend.store
        data = store.get_record(AC_NAMESPACE, action_key(instance, action))
        if data is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no action result for {action}")
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
            needed = referenced_blobs(store, result)
        except (DecodeError, DigestError):
            needed = None
        if needed is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"action result for {action} is incomplete")
        missing = store.find_missing(needed)  # also refreshes what the build will fetch
        if missing:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"action result for {action} references {len(missing)} missing blob(s), "
                f"e.g. {missing[0]}",
            )
        self._inline(store, result, request)
        return result

    @staticmethod
    def _inline(
        store: Store, result: re_pb2.ActionResult, request: re_pb2.GetActionResultRequest
    ) -> None:
        """Fill stdout/stderr/file contents the client asked for, where they are small."""

        def small(digest: re_pb2.Digest) -> bytes | None:
            if not _present(digest) or digest.size_bytes > INLINE_LIMIT:
                return None
            blob = BlobId.from_proto(digest)
            return b"" if blob == EMPTY_BLOB else store.get_blob(blob)

        if request.inline_stdout and not result.stdout_raw:
            result.stdout_raw = small(result.stdout_digest) or b""
        if request.inline_stderr and not result.stderr_raw:
            result.stderr_raw = small(result.stderr_digest) or b""
        wanted = set(request.inline_output_files)
        budget = INLINE_LIMIT
        for out in result.output_files:
            if out.path in wanted and not out.contents and out.digest.size_bytes <= budget:
                data = small(out.digest)
                if data is not None:
                    out.contents = data
                    budget -= len(data)

    @grpc_errors
    async def UpdateActionResult(
        self, request: re_pb2.UpdateActionResultRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> re_pb2.ActionResult:
        instance = instance_ok(request.instance_name)
        check_function(request.digest_function)
        action = blob_from_request(request.action_digest, "action_digest")
        if not self.backend.update_enabled:
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "action cache updates are disabled")
        result = request.action_result
        for out in result.output_files:
            blob_from_request(out.digest, f"output file {out.path!r} digest")
        for out_dir in result.output_directories:
            blob_from_request(out_dir.tree_digest, f"output directory {out_dir.path!r} tree_digest")
        data = result.SerializeToString()
        if len(data) > MAX_BATCH_TOTAL_SIZE:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "action result is too large")
        await self.backend.run_store(
            self.backend.store.put_record,
            AC_NAMESPACE,
            action_key(instance, action),
            data,
            writes=True,
        )
        return result
