"""The `slipstream cache` client against a server that wants a token and mutual TLS.

The client takes its token and certificates from the environment
(SLIPSTREAM_TOKEN, SLIPSTREAM_TLS_CA/CERT/KEY) and a grpcs:// address.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from tests.ops.helpers import Token, make_pki, write_token_file
from tests.support.server_process import ServerProcess, running

TRUSTED = Token("layers-writer", "tok-client-creds-5521", ("read", "cas-write", "ac-write"))


def _cache(
    args: list[str], env: dict[str, str], cwd: pathlib.Path
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLIPSTREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "slipstream.cli", "cache", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=cwd,
        timeout=120,
    )


def test_cache_client_sends_token_over_mutual_tls(tmp_path: pathlib.Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tokens = write_token_file(tmp_path / "tokens.toml", [TRUSTED])
    server = ServerProcess(
        tmp_path / "store",
        [
            "--token-file", str(tokens),
            "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca),
        ],
        credentials=pki.channel_credentials(client=True),
    )  # fmt: skip
    work = tmp_path / "work"
    (work / "deps").mkdir(parents=True)
    (work / "deps" / "lib.txt").write_text("cached bytes\n")
    tls = {
        "SLIPSTREAM_TLS_CA": str(pki.ca),
        "SLIPSTREAM_TLS_CERT": str(pki.client_cert),
        "SLIPSTREAM_TLS_KEY": str(pki.client_key),
    }
    with running(server):
        address = f"grpcs://{server.address}"
        save = ["save", "--key", "deps-1", "--server", address, "deps"]
        ok = _cache(save, {**tls, "SLIPSTREAM_TOKEN": TRUSTED.value}, work)
        assert ok.returncode == 0, ok.stderr
        no_token = _cache([*save[:2], "deps-2", *save[3:]], tls, work)
        assert no_token.returncode == 1
        assert "UNAUTHENTICATED" in no_token.stderr and len(no_token.stderr.splitlines()) == 1
        no_cert = _cache(
            save, {"SLIPSTREAM_TLS_CA": str(pki.ca), "SLIPSTREAM_TOKEN": TRUSTED.value}, work
        )
        assert no_cert.returncode == 1 and len(no_cert.stderr.splitlines()) == 1
        restore = [
            "restore",
            "--key",
            "deps-1",
            "--server",
            address,
            "--into",
            str(tmp_path / "out"),
        ]
        got = _cache(restore, {**tls, "SLIPSTREAM_TOKEN": TRUSTED.value}, work)
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "out" / "deps" / "lib.txt").read_text() == "cached bytes\n"
