"""Where the server listens by default, and how a client names the server it talks to."""

from __future__ import annotations

import os

DEFAULT_PORT = 9380  # below the ephemeral range (32768-60999), so it is free to bind
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
SERVER_VARIABLE = "SLIPSTREAM_SERVER"


def server_address(given: str | None) -> str:
    """The server to talk to: given, else $SLIPSTREAM_SERVER, else the default.

    HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT (TLS; kept as it is for
    connect). ValueError, with the reason, for anything else.
    """
    address = (given or os.environ.get(SERVER_VARIABLE) or DEFAULT_LISTEN).rstrip("/")
    scheme, sep, rest = address.partition("://")
    if sep and scheme not in ("grpc", "grpcs"):
        raise ValueError(f"server {address!r}: the scheme must be grpc:// or grpcs://")
    host, _, port = (rest if sep else address).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"server {address!r} is not HOST:PORT")
    return address if scheme == "grpcs" else f"{host}:{port}"
