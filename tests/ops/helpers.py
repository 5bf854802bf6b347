"""Helpers for the security and operations tests: tokens, certificates, headers."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

from slipstream.cache_server.auth import hash_token
from slipstream.client.cas_client import HeaderInterceptor, bearer
from tests.support.server_process import ServerProcess, output_line


@dataclass(frozen=True)
class Token:
    name: str
    value: str  # what the client sends; only its sha256 goes in the file
    scopes: tuple[str, ...]
    limits: tuple[tuple[str, Any], ...] = ()


def write_token_file(path: pathlib.Path, tokens: Sequence[Token]) -> pathlib.Path:
    lines = ["# test tokens: sha256 of each token, never the token\n"]
    for t in tokens:
        scopes = ", ".join(f'"{s}"' for s in t.scopes)
        lines.append(f'[[token]]\nname = "{t.name}"\nsha256 = "{hash_token(t.value)}"\n')
        lines.append(f"scopes = [{scopes}]\n")
        for key, value in t.limits:
            lines.append(f'{key} = "{value}"\n' if isinstance(value, str) else f"{key} = {value}\n")
    path.write_text("".join(lines))
    return path


@contextmanager
def channel_for(
    server: ServerProcess,
    token: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[grpc.Channel]:
    """A channel to server that sends `authorization: Bearer token` (and headers) on every call."""
    creds = credentials or server.credentials
    base = (
        grpc.secure_channel(server.address, creds)
        if creds is not None
        else grpc.insecure_channel(server.address)
    )
    extra = list(headers)
    if token is not None:
        extra.append(bearer(token))
    with base:
        yield grpc.intercept_channel(base, HeaderInterceptor(extra)) if extra else base


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus endpoint: {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metrics_url(server: ServerProcess) -> str:
    return output_line(server, "metrics on ").split("metrics on ", 1)[1].strip()


# ---- certificates ----
@dataclass(frozen=True)
class Pki:
    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    # A client certificate from a CA the server does not trust.
    stranger_cert: pathlib.Path
    stranger_key: pathlib.Path

    def channel_credentials(self, client: bool = False, stranger: bool = False) -> Any:
        chain = key = None
        if client or stranger:
            chain = (self.stranger_cert if stranger else self.client_cert).read_bytes()
            key = (self.stranger_key if stranger else self.client_key).read_bytes()
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), key, chain)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: pathlib.Path, key: ec.EllipticCurvePrivateKey) -> pathlib.Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _issue(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def make_pki(root: pathlib.Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's."""
    root.mkdir(parents=True, exist_ok=True)

    def pem(name: str, cert: x509.Certificate) -> pathlib.Path:
        path = root / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca = _issue("slipstream test CA", None, ca=True)
    server_cert, server_key = _issue("127.0.0.1", ca, server=True)
    client_cert, client_key = _issue("builder-1", ca)
    other_ca = _issue("some other CA", None, ca=True)
    stranger_cert, stranger_key = _issue("stranger", other_ca)
    return Pki(
        ca=pem("ca.pem", ca[0]),
        server_cert=pem("server.pem", server_cert),
        server_key=_write_key(root / "server.key", server_key),
        client_cert=pem("client.pem", client_cert),
        client_key=_write_key(root / "client.key", client_key),
        stranger_cert=pem("stranger.pem", stranger_cert),
        stranger_key=_write_key(root / "stranger.key", stranger_key),
    )


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a call that must fail."""
    from tests.support.reapi import rpc_error

    failure = rpc_error(call)
    return failure.code(), failure.details()
