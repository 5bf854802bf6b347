"""Capabilities: what this cache offers, so clients pick the right protocol paths."""

from __future__ import annotations

from typing import Any

import grpc

from slipstream.cache_server.auth import AC_WRITE, current_caller
from slipstream.cache_server.services.common import MAX_BATCH_TOTAL_SIZE, Backend, grpc_errors
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc
from slipstream.protos import semver_pb2

# Bazel 4 speaks API 2.0; current clients speak up to 2.3.
LOW_API = semver_pb2.SemVer(major=2, minor=0)
HIGH_API = semver_pb2.SemVer(major=2, minor=3)


class CapabilitiesService(re_grpc.CapabilitiesServicer):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @grpc_errors
    async def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> re_pb2.ServerCapabilities:
        zstd = [re_pb2.Compressor.ZSTD]
        caller = current_caller()  # what this caller may do, not what anyone may
        limits = caller.limits
        cache = re_pb2.CacheCapabilities(
            digest_functions=[re_pb2.DigestFunction.SHA256],
            action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                update_enabled=self.backend.update_enabled and caller.allows(AC_WRITE)
            ),
            cache_priority_capabilities=re_pb2.PriorityCapabilities(
                priorities=[
                    re_pb2.PriorityCapabilities.PriorityRange(min_priority=0, max_priority=0)
                ]
            ),
            max_batch_total_size_bytes=min(
                MAX_BATCH_TOTAL_SIZE, limits.max_batch_size or MAX_BATCH_TOTAL_SIZE
            ),
            max_cas_blob_size_bytes=limits.max_blob_size or 0,
            symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.ALLOWED,
            supported_compressors=zstd,
            supported_batch_update_compressors=zstd,
        )
        return re_pb2.ServerCapabilities(
            cache_capabilities=cache,
            deprecated_api_version=LOW_API,
            low_api_version=LOW_API,
            high_api_version=HIGH_API,
        )
