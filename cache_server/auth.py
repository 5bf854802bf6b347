"""Who may do what: bearer tokens with scopes, checked by a hook around every call.

Scopes:

    read        read blobs, action results and layers (FindMissingBlobs, BatchReadBlobs,
                GetTree, ByteStream Read, GetActionResult, GetLayer)
    cas-write   upload blobs (BatchUpdateBlobs, ByteStream Write and QueryWriteStatus);
                CAS writes are self-verifying, so this is safe for untrusted builds.
                Also the split service's writes (timings, plans, queue leases): runs
                are kept per token, so one token cannot steer or finish another's
    ac-write    write records that are not self-verifying: UpdateActionResult and
                PutLayer. Whoever holds it can poison every build that reads the
                cache: give it only to trusted pipelines (e.g. main-branch builds)

Capabilities needs no scope, but does need a known token when anonymous access is
off; health checking and reflection are always open (probes use them).

The token file (TOML; the server reads it at start, `slipstream token new` makes entries):

    [[token]]
    name = "ci-main"                 # who: shown in logs, metrics and the audit log
    sha256 = "5e88...1d7a"           # sha256 hex of the token; the token itself is never stored
    scopes = ["read", "cas-write", "ac-write"]
    # optional per-caller limits, overriding the server's --max-blob-size etc.
    max_blob_size = "2G"
    max_batch_size = "2M"
    max_streams = 200

Clients send `authorization: Bearer TOKEN` (Bazel: --remote_header=Authorization=Bearer TOKEN).
A call with no token is anonymous: refused (UNAUTHENTICATED) when anonymous access
is "off", limited to `read` when it is "read". A call with a token the server does
not know is refused (UNAUTHENTICATED) whatever the anonymous setting: a mistyped
token should fail loudly, not quietly downgrade to anonymous. Without a token
file the server is open: everyone has every scope (the behaviour before auth).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from slipstream.cache_server.calls import Call, Hook, current_call
from slipstream.cache_server.services.common import RpcError
from slipstream.core.sizes import parse_size

READ = "read"
CAS_WRITE = "cas-write"
AC_WRITE = "ac-write"
SCOPES = (READ, CAS_WRITE, AC_WRITE)

ANONYMOUS_OFF = "off"
ANONYMOUS_READ = "read"
ANONYMOUS_MODES = (ANONYMOUS_OFF, ANONYMOUS_READ)

_RE = "/build.bazel.remote.execution.v2."
_BS = "/google.bytestream.ByteStream/"
_LAYERS = "/slipstream.layers.v1.Layers/"

# The scope each method needs; None: any caller let in at all.
METHOD_SCOPES: dict[str, str | tuple[str, ...] | None] = {
    f"{_RE}Capabilities/GetCapabilities": None,
    f"{_RE}ContentAddressableStorage/FindMissingBlobs": READ,
    f"{_RE}ContentAddressableStorage/BatchReadBlobs": READ,
    f"{_RE}ContentAddressableStorage/GetTree": READ,
    f"{_RE}ContentAddressableStorage/BatchUpdateBlobs": CAS_WRITE,
    f"{_RE}ActionCache/GetActionResult": READ,
    f"{_RE}ActionCache/UpdateActionResult": AC_WRITE,
    f"{_BS}Read": READ,
    f"{_BS}Write": CAS_WRITE,
    f"{_BS}QueryWriteStatus": CAS_WRITE,
    f"{_LAYERS}GetLayer": READ,
    f"{_LAYERS}PutLayer": AC_WRITE,
}
# A method of a covered service that is not listed above needs every scope:
# a new service must say what it needs (register_method) before readers can use it.
UNLISTED_SCOPES = SCOPES

TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def register_method(method: str, scope: str | tuple[str, ...] | None) -> None:
    """Declare the scope (or scopes, all needed) a method needs, e.g. ("/pkg.Service/Get", READ)."""
    for one in (scope,) if scope is None or isinstance(scope, str) else scope:
        if one is not None and one not in SCOPES:
            raise ValueError(f"unknown scope {one!r}")
    METHOD_SCOPES[method] = scope


def hash_token(token: str) -> str:
    """What the token file stores for a token: its sha256, as lowercase hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Limits:
    """Per-caller limits; None means no limit of that kind."""

    max_blob_size: int | None = None  # bytes of one uploaded blob
    max_batch_size: int | None = None  # bytes of one BatchUpdateBlobs / BatchReadBlobs
    max_streams: int | None = None  # calls in flight at once (each gRPC call is a stream)

    def override(self, **values: int | None) -> Limits:
        return replace(self, **{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the handlers and hooks see it."""

    name: str
    scopes: frozenset[str]
    limits: Limits = field(default_factory=Limits)
    authenticated: bool = False

    def allows(self, scope: str | None) -> bool:
        return scope is None or scope in self.scopes


# Who calls when no auth hook ran (a server without auth, or code outside a call).
OPEN = Caller("anonymous", frozenset(SCOPES))


def current_caller() -> Caller:
    call = current_call()
    if call is not None and isinstance(call.caller, Caller):
        return call.caller
    return OPEN


class TokenFileError(ValueError):
    """The token file does not parse or holds an invalid entry."""


def _limit(entry: dict[str, Any], key: str, where: str, size: bool) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if size and isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise TokenFileError(f"{where}: {key}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TokenFileError(f"{where}: {key} must be a positive integer, not {value!r}")
    return value


@dataclass(frozen=True)
class TokenEntry:
    name: str
    sha256: str
    scopes: frozenset[str]
    limits: dict[str, int | None]


def parse_tokens(text: str, source: str) -> dict[str, TokenEntry]:
    """Token entries by sha256 from the TOML text of a token file; TokenFileError if invalid."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TokenFileError(f"{source}: {exc}") from None
    unknown = sorted(set(doc) - {"token"})
    if unknown:
        raise TokenFileError(f"{source}: unknown key {unknown[0]!r} (entries are [[token]] tables)")
    entries = doc.get("token", [])
    if not isinstance(entries, list):
        raise TokenFileError(f"{source}: 'token' must be an array of tables ([[token]])")
    tokens: dict[str, TokenEntry] = {}
    names: set[str] = set()
    allowed = {"name", "sha256", "scopes", "max_blob_size", "max_batch_size", "max_streams"}
    for i, entry in enumerate(entries, 1):
        where = f"{source}: token #{i}"
        if not isinstance(entry, dict):
            raise TokenFileError(f"{where} is not a table")
        extra = sorted(set(entry) - allowed)
        if extra:
            hint = " (store the sha256 of the token, not the token)" if extra[0] == "token" else ""
            raise TokenFileError(f"{where}: unknown key {extra[0]!r}{hint}")
        name = entry.get("name")
        if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
            raise TokenFileError(
                f"{where}: name must be 1-64 characters of letters, digits and _.@:- (got {name!r})"
            )
        where = f"{source}: token {name!r}"
        if name in names:
            raise TokenFileError(f"{where} appears twice")
        names.add(name)
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise TokenFileError(
                f"{where}: sha256 must be 64 lowercase hex digits "
                "(make one with `slipstream token hash`)"
            )
        if digest in tokens:
            raise TokenFileError(f"{where} has the same token as {tokens[digest].name!r}")
        scopes = entry.get("scopes")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise TokenFileError(f"{where}: scopes must be a list such as {list(SCOPES)}")
        bad = [s for s in scopes if s not in SCOPES]
        if bad:
            raise TokenFileError(f"{where}: unknown scope {bad[0]!r} (known: {', '.join(SCOPES)})")
        limits = {
            "max_blob_size": _limit(entry, "max_blob_size", where, size=True),
            "max_batch_size": _limit(entry, "max_batch_size", where, size=True),
            "max_streams": _limit(entry, "max_streams", where, size=False),
        }
        tokens[digest] = TokenEntry(name, digest, frozenset(scopes), limits)
    return tokens


def _peer_host(peer: str) -> str:
    """The address in a gRPC peer ("ipv4:127.0.0.1:5555", "ipv6:[::1]:5555") or an HTTP
    remote ("127.0.0.1", "::1"), the same for both protocols."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer.strip("[]")


class Authenticator(Hook):
    """Identifies the caller of each call and refuses what its scopes do not allow.

    tokens None: the server is open (no token file); every caller has every scope.
    """

    def __init__(
        self,
        tokens: dict[str, TokenEntry] | None,
        anonymous: str = ANONYMOUS_OFF,
        limits: Limits | None = None,
    ) -> None:
        if anonymous not in ANONYMOUS_MODES:
            raise ValueError(f"anonymous access must be one of {ANONYMOUS_MODES}")
        self.limits = limits or Limits()
        self.open = tokens is None
        self.anonymous = anonymous
        self.callers: dict[str, Caller] = {
            digest: Caller(
                entry.name, entry.scopes, self.limits.override(**entry.limits), authenticated=True
            )
            for digest, entry in (tokens or {}).items()
        }
        anon_scopes = frozenset(SCOPES) if self.open else frozenset()
        if anonymous == ANONYMOUS_READ and not self.open:
            anon_scopes = frozenset({READ})
        self.anonymous_caller = Caller("anonymous", anon_scopes, self.limits)

    def describe(self) -> str:
        if self.open:
            return "open: no token file, every caller may read and write"
        anon = "anonymous callers may read" if self.anonymous == ANONYMOUS_READ else "no anonymous"
        return f"{len(self.callers)} token(s), {anon}"

    def identify(self, call: Call) -> Caller:
        return self.identify_header(call.metadata("authorization"))

    def identify_header(self, header: str | None) -> Caller:
        """The caller an authorization header (or its absence) names; RpcError if refused."""
        if self.open:
            return self.anonymous_caller
        if header is None:
            if self.anonymous == ANONYMOUS_OFF:
                raise RpcError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server needs a token: send 'authorization: Bearer TOKEN'",
                )
            return self.anonymous_caller
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise RpcError(
                grpc.StatusCode.UNAUTHENTICATED,
                "the authorization header must be 'Bearer TOKEN'",
            )
        digest = hash_token(token)
        for known, caller in self.callers.items():
            if hmac.compare_digest(known, digest):
                return caller
        raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "the token is not known to this server")

    def begin(self, call: Call) -> None:
        caller = self.identify(call)
        call.caller = caller
        scopes = METHOD_SCOPES.get(call.method, UNLISTED_SCOPES)
        needed = (scopes,) if scopes is None or isinstance(scopes, str) else scopes
        missing = [s for s in needed if not caller.allows(s)]
        if missing:
            who = f"caller {caller.name!r}" if caller.authenticated else "an anonymous caller"
            raise RpcError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{call.what} needs scope {missing[0]!r}, which {who} does not have",
            )

    @staticmethod
    def limit_key(call: Call) -> str:
        """Whose share of the limits a call counts against: anonymous callers per address."""
        caller = call.caller if isinstance(call.caller, Caller) else OPEN
        if caller.authenticated:
            return caller.name
        return f"anonymous@{_peer_host(call.peer)}"
