"""What the security and operations settings add to a CacheServer.

The hooks around every call (access log, metrics, authentication, limits,
audit: cache_server.calls), the TLS credentials of the gRPC port, the metrics
HTTP server, and a plaintext health-only gRPC port for probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from slipstream.cache_server.audit import AuditLog
from slipstream.cache_server.auth import Authenticator
from slipstream.cache_server.calls import AccessLog, CallWrapper, Hook
from slipstream.cache_server.config import OpsConfig
from slipstream.cache_server.limits import LimitEnforcer
from slipstream.cache_server.metrics import Metrics
from slipstream.cache_server.services.common import FOREIGN_SERVICES, RejectMalformed
from slipstream.cache_server.storage.base import Store
from slipstream.cache_server.usage import (
    MAX_SAVED,
    SAVE_INTERVAL,
    SAVED_NAMESPACE,
    SAVED_PREFIX,
    Usage,
    combined,
)

log = logging.getLogger("cache_server")

# gRPC binds with SO_REUSEPORT by default: a second server on a port another one
# holds would start, and the kernel would split connections between the two. The
# workers of `serve --workers N` share their ports on purpose (cache_server/workers.py).
NO_REUSEPORT = ("grpc.so_reuseport", 0)


class Operations:
    def __init__(self, config: OpsConfig, store: Store, *, shares_ports: bool = False) -> None:
        """shares_ports: the probe port is shared with the other workers of the server."""
        self.config = config
        self.shares_ports = shares_ports
        self.store = store
        self.auth = Authenticator(config.tokens, config.anonymous, config.limits)
        self.metrics = Metrics(store)
        self.audit = AuditLog(config.audit_log) if config.audit_log else None
        # Order matters: metrics and the access log see every call, refused ones
        # too; limits and audit need the caller that authentication finds.
        hooks: list[Hook] = [AccessLog(), self.metrics, self.auth, LimitEnforcer()]
        if self.audit is not None:
            hooks.append(self.audit)
        self.hooks = hooks
        self.metrics_url: str | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self._saving: asyncio.Task[None] | None = None

    def interceptor(self, method_prefixes: tuple[str, ...]) -> CallWrapper:
        return CallWrapper(self.hooks, method_prefixes)

    def bind(self, server: grpc.aio.Server, listen: str) -> int:
        """Add the gRPC port, with TLS if configured; returns the bound port."""
        tls = self.config.tls
        if tls is None:
            return server.add_insecure_port(listen)
        credentials = grpc.ssl_server_credentials(
            [(tls.key, tls.cert)],
            root_certificates=tls.client_ca,
            require_client_auth=tls.client_ca is not None,
        )
        return server.add_secure_port(listen, credentials)

    @property
    def transport(self) -> str:
        tls = self.config.tls
        if tls is None:
            return "plaintext"
        return "mutual TLS" if tls.client_ca is not None else "TLS"

    async def start(self, servicer: health.aio.HealthServicer) -> None:
        """Start the metrics HTTP server and the probe port, if configured, and the
        saving of the pages' figures."""
        self._saving = asyncio.create_task(self._save_usage_every(SAVE_INTERVAL))
        if self.config.metrics_listen:
            try:
                self.metrics_url = self.metrics.serve(self.config.metrics_listen)
            except OSError as exc:
                raise OSError(
                    f"cannot serve metrics on {self.config.metrics_listen}: {exc.strerror or exc}"
                ) from None
        if self.config.health_listen:
            probe = grpc.aio.server(
                interceptors=[RejectMalformed(FOREIGN_SERVICES)],
                options=[] if self.shares_ports else [NO_REUSEPORT],
            )
            health_pb2_grpc.add_HealthServicer_to_server(servicer, probe)
            try:
                self.health_port = probe.add_insecure_port(self.config.health_listen)
            except RuntimeError:
                raise OSError(
                    f"cannot serve health checks on {self.config.health_listen}: "
                    "the port is in use or the host is not this machine's"
                ) from None
            await probe.start()
            self._health_server = probe

    async def stop(self, grace: float) -> None:
        if self._saving is not None:
            self._saving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saving
            self._saving = None
            await asyncio.to_thread(self.save_usage)
        if self._health_server is not None:
            await self._health_server.stop(grace)
        self.metrics.close()
        if self.audit is not None:
            self.audit.close()

    # ---- the pages' figures: this process's and every other's saved record ----
    def save_usage(self) -> None:
        usage = self.metrics.usage
        try:
            self.store.put_record(SAVED_NAMESPACE, usage.key, usage.saved())
        except Exception as exc:
            log.warning("the pages' figures could not be saved: %s", exc)

    def usage_figures(self) -> Usage:
        """This process's figures and the other processes' saved ones, added up (see
        cache_server.usage); records past the day and unreadable ones are removed,
        the unreadable ones with a warning. Blocking: it reads the store."""
        infos = self.store.list_records(SAVED_NAMESPACE, SAVED_PREFIX, MAX_SAVED)
        own = self.metrics.usage.key  # its figures are in memory, newer than its record
        saved = []
        for info in infos:
            if info.key == own:
                continue
            data = self.store.get_record(SAVED_NAMESPACE, info.key)
            if data is not None:
                saved.append((info.key, data))
        total, expired, problems = combined(self.metrics.usage, saved)
        for key, why in problems:
            log.warning("an unreadable record of the pages' figures is removed: %s: %s", key, why)
        for key in expired + [key for key, _ in problems]:
            with contextlib.suppress(Exception):
                self.store.delete_record(SAVED_NAMESPACE, key)
        return total

    async def _save_usage_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await asyncio.to_thread(self.save_usage)

    def describe(self) -> list[str]:
        """Start-up lines about what is on (printed by `slipstream serve`)."""
        lines = [f"access: {self.auth.describe()}"]
        if self.metrics_url:
            lines.append(f"metrics on {self.metrics_url}")
        if self.health_port is not None:
            host = (self.config.health_listen or "").rpartition(":")[0]
            lines.append(f"health checks (plaintext) on {host}:{self.health_port}")
        if self.audit is not None:
            lines.append(f"audit log: {self.audit.path}")
        return lines
