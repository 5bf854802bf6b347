"""Configuration: a TOML file, SLIPSTREAM_* variables, flags over both; checked at start."""

from __future__ import annotations

import argparse
import pathlib

import grpc
import pytest

import slipstream.cache_server.cli
from slipstream.cache_server.config import apply_layers
from slipstream.cli import build_parser, main
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.ops.helpers import Token, channel_for, make_pki, write_token_file
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, output_line, running

READER = Token("reader", "tok-config-reader-1", ("read",))


def _parse(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    args = build_parser().parse_args(["serve", *argv])
    apply_layers(args, environ)
    return args


def test_flags_override_environment_override_file(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "slipstream.toml"
    config.write_text(
        'listen = "127.0.0.1:5"\n'
        'anonymous = "off"\n'
        'max_blob_size = "1K"\n'
        "max_streams = 9\n"
        "read_only_ac = true\n"
        'log_level = "info"\n'
        "[s3]\n"
        'endpoint = "http://127.0.0.1:9000"\n'
        "[tls]\n"
        'cert = "/etc/tls/tls.crt"\n'
    )
    env = {
        "SLIPSTREAM_CONFIG": str(config),
        "SLIPSTREAM_ANONYMOUS": "read",
        "SLIPSTREAM_MAX_STREAMS": "3",
        "SLIPSTREAM_LISTEN": "0.0.0.0:1",
        "SLIPSTREAM_SERVER": "ignored: not a serve option (the client's variable)",
    }
    args = _parse(["--max-streams", "7"], env)
    assert args.max_streams == 7  # flag over env over file
    assert args.listen == "0.0.0.0:1"  # env over file
    assert args.anonymous == "read"
    assert args.max_blob_size == "1K"  # file
    assert args.read_only_ac is True
    assert args.log_level == "info"
    assert args.s3_endpoint == "http://127.0.0.1:9000"  # a [table] prefixes its keys
    assert args.tls_cert == "/etc/tls/tls.crt"
    assert args.s3_timeout == 10.0  # defaults stay where nothing is set
    assert args.log_format == "text"
    # --config on the command line wins over $SLIPSTREAM_CONFIG; false from env wins over true.
    other = tmp_path / "other.toml"
    other.write_text("max_streams = 11\n")
    args = _parse(["--config", str(other)], {**env, "SLIPSTREAM_READ_ONLY_AC": "false"})
    assert (args.max_streams, args.read_only_ac, args.anonymous) == (3, False, "read")
    args = _parse(["--config", str(other)], {})
    assert (args.max_streams, args.read_only_ac, args.listen) == (11, False, "127.0.0.1:9380")


def _write(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _cases(tmp: pathlib.Path) -> list[tuple[list[str], dict[str, str], str]]:
    pki = make_pki(tmp / "pki")
    tokens = write_token_file(tmp / "tokens.toml", [READER])
    return [
        (
            ["--config", _write(tmp / "a.toml", 'colour = "blue"\n')],
            {},
            f"config file {tmp / 'a.toml'}: unknown setting 'colour'",
        ),
        (
            ["--config", _write(tmp / "b.toml", "listen = \n")],
            {},
            f"config file {tmp / 'b.toml'}: Invalid value (at line 1, column 10)",
        ),
        (
            ["--config", str(tmp / "missing.toml")],
            {},
            f"config file {tmp / 'missing.toml'}: No such file or directory",
        ),
        (
            [],
            {"SLIPSTREAM_MAX_STREAMS": "lots"},
            "SLIPSTREAM_MAX_STREAMS: 'lots' is not valid "
            "(invalid literal for int() with base 10: 'lots')",
        ),
        (
            [],
            {"SLIPSTREAM_READ_ONLY_AC": "maybe"},
            "SLIPSTREAM_READ_ONLY_AC: expected true or false, got 'maybe'",
        ),
        (
            ["--config", _write(tmp / "c.toml", 'anonymous = "sometimes"\n')],
            {},
            f"config file {tmp / 'c.toml'}: anonymous: 'sometimes' is not one of off, read",
        ),
        (
            ["--config", _write(tmp / "d.toml", "max_streams = 1.5\n")],
            {},
            f"config file {tmp / 'd.toml'}: max_streams: expected an integer, got 1.5",
        ),
        (
            ["--anonymous", "read"],
            {},
            "--anonymous needs a token file (--token-file or $SLIPSTREAM_TOKENS)",
        ),
        (
            ["--token-file", _write(tmp / "t1.toml", '[[token]]\nname = "x"\ntoken = "abc"\n')],
            {},
            f"token file {tmp / 't1.toml'}: token #1: unknown key 'token' "
            "(store the sha256 of the token, not the token)",
        ),
        (
            [],
            {
                "SLIPSTREAM_TOKENS": f'[[token]]\nname = "x"\nsha256 = "{"a" * 64}"\n'
                'scopes = ["admin"]\n'
            },
            "$SLIPSTREAM_TOKENS: token 'x': unknown scope 'admin' (known: read, cas-write, "
            "ac-write)",
        ),
        (
            ["--token-file", str(tokens), "--max-streams", "0"],
            {},
            "--max-streams must be at least 1",
        ),
        (["--tls-cert", str(pki.server_cert)], {}, "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", str(pki.ca)], {}, "--tls-client-ca needs --tls-cert and --tls-key"),
        (
            ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)],
            {},
            "--tls-cert/--tls-key: the key does not fit the certificate or does not load "
            "([X509: KEY_VALUES_MISMATCH] key values mismatch",
        ),
        (
            ["--tls-cert", str(pki.server_key), "--tls-key", str(pki.server_key)],
            {},
            f"--tls-cert {pki.server_key}: no PEM certificate in it",
        ),
        (
            ["--config", _write(tmp / "e.toml", "registry_upstream = 5\n")],
            {},
            f"config file {tmp / 'e.toml'}: registry_upstream: expected a list of strings, got 5",
        ),
        (
            ["--config", _write(tmp / "f.toml", "registry_upstream = [true]\n")],
            {},
            f"config file {tmp / 'f.toml'}: registry_upstream: expected a string or number",
        ),
        (["--max-blob-size", "huge"], {}, "--max-blob-size: 'huge' is not a size"),
        (["--log-level", "LOUD"], {}, "--log-level 'LOUD' is not one of DEBUG, INFO, WARNING"),
        (["--metrics-listen", "9090"], {}, "--metrics-listen '9090' is not HOST:PORT"),
        (
            ["--audit-log", str(tmp / "no" / "such" / "dir" / "audit.jsonl")],
            {},
            f"--audit-log {tmp / 'no/such/dir/audit.jsonl'}: No such file or directory",
        ),
    ]


def test_a_repeatable_flag_from_file_and_environment(tmp_path: pathlib.Path) -> None:
    """--registry-upstream, given once per upstream on the command line, is a TOML array
    (or one string) in the file and words in the environment; the layers' order holds."""
    config = tmp_path / "slipstream.toml"
    config.write_text(
        'registry_upstream = ["hub=https://registry-1.docker.io", "http://127.0.0.1:5000"]\n'
    )
    file_only = {"SLIPSTREAM_CONFIG": str(config)}
    assert _parse([], file_only).registry_upstream == [
        "hub=https://registry-1.docker.io",
        "http://127.0.0.1:5000",
    ]
    env = {**file_only, "SLIPSTREAM_REGISTRY_UPSTREAM": " ghcr=https://ghcr.io  http://m:5000 "}
    assert _parse([], env).registry_upstream == ["ghcr=https://ghcr.io", "http://m:5000"]
    flags = ["--registry-upstream", "http://flag:1"]
    assert _parse(flags, env).registry_upstream == ["http://flag:1"]
    config.write_text('registry_upstream = "http://one:5000"\n')
    assert _parse([], file_only).registry_upstream == ["http://one:5000"]
    assert _parse([], {}).registry_upstream is None


def test_bad_settings_stop_the_server_with_one_line(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def must_not_serve(config: object) -> None:
        raise AssertionError("the server started despite a bad setting")

    monkeypatch.setattr(slipstream.cache_server.cli, "serve", must_not_serve)
    for name in ("SLIPSTREAM_CONFIG", "SLIPSTREAM_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    for argv, env, expected in _cases(tmp_path):
        with monkeypatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            code = main(["serve", "--storage", str(tmp_path / "store"), *argv])
        err = capsys.readouterr().err
        assert code == 2, (argv, env, err)
        assert err.count("\n") == 1, err
        assert err.startswith(f"slipstream serve: error: {expected}"), (argv, env, err)


def test_server_configured_by_file_environment_and_flags(tmp_path: pathlib.Path) -> None:
    tokens = write_token_file(tmp_path / "tokens.toml", [READER])
    config = tmp_path / "slipstream.toml"
    config.write_text(
        f'token_file = "{tokens}"\nanonymous = "off"\nmax_blob_size = "1K"\nlog_format = "json"\n'
    )
    env = {"SLIPSTREAM_CONFIG": str(config), "SLIPSTREAM_ANONYMOUS": "read"}
    server = ServerProcess(tmp_path / "store", ["--max-blob-size", "2K"], env=env)
    with running(server):
        output_line(server, "access: 1 token(s), anonymous callers may read")
        with channel_for(server) as ch:  # anonymous reads: the environment beat the file
            api = Reapi(ch)
            assert api.missing(digest(b"")) == []
            with pytest.raises(grpc.RpcError) as info:
                api.upload(b"anonymous write")
            assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with channel_for(server, READER.value) as ch:  # the token file from the config file
            caps = Reapi(ch).caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
            # The flag beat the file.
            assert caps.cache_capabilities.max_cas_blob_size_bytes == 2048
