"""Configuration of `slipstream serve`: flags over SLIPSTREAM_* variables over a TOML file.

Every option of `slipstream serve` can also be set

  - in a TOML file (--config FILE, or $SLIPSTREAM_CONFIG): the option's name with
    underscores, e.g. `listen = "0.0.0.0:9380"`, `max_blob_size = "1G"`,
    `read_only_ac = true`; a table prefixes its keys, so `[s3] endpoint = ...` is
    `s3_endpoint` and `[tls] cert = ...` is `tls_cert`; a repeatable flag is an array;
  - in the environment: SLIPSTREAM_ and the name in capitals, e.g.
    SLIPSTREAM_LISTEN=0.0.0.0:9380, SLIPSTREAM_TOKEN_FILE=/etc/slipstream/tokens.toml,
    SLIPSTREAM_READ_ONLY_AC=true; a repeatable flag's values as words.

A flag on the command line wins over the environment, which wins over the file.
Everything is checked before the server starts; a bad value stops it with one
line naming where the value came from, and exit code 2.

This covers options registered by every part of the server (storage, S3, ...):
`layered(parser)` is called once all of them are added.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import ssl
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from slipstream.cache_server.auth import (
    ANONYMOUS_MODES,
    Limits,
    TokenEntry,
    TokenFileError,
    parse_tokens,
)
from slipstream.cache_server.logs import LEVELS, LOG_FORMATS
from slipstream.core.errors import UsageError
from slipstream.core.sizes import parse_duration, parse_size

ENV_PREFIX = "SLIPSTREAM_"
CONFIG_ENV = "SLIPSTREAM_CONFIG"
TOKENS_ENV = "SLIPSTREAM_TOKENS"  # the token file's text itself, e.g. from a Secret
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class TlsConfig:
    cert: bytes  # PEM certificate chain
    key: bytes  # PEM private key
    client_ca: bytes | None = None  # PEM CA bundle: mutual TLS, client certificates required


@dataclass
class OpsConfig:
    """Security and operations settings of a server (all off: the open, plain server)."""

    tokens: dict[str, TokenEntry] | None = None  # None: no token file, open server
    anonymous: str = "off"
    limits: Limits = field(default_factory=Limits)
    tls: TlsConfig | None = None
    metrics_listen: str | None = None
    health_listen: str | None = None
    audit_log: str | None = None
    # The pipeline's wall-time targets the /ui/ pages measure runs against: build, test, total.
    ui_targets: tuple[float, float, float] = (600.0, 1200.0, 2700.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The security and operations options of `slipstream serve`."""
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML file of settings (default ${CONFIG_ENV}); "
        "flags override $SLIPSTREAM_* variables, which override the file",
    )
    auth = p.add_argument_group("authentication and limits")
    auth.add_argument(
        "--token-file",
        metavar="FILE",
        help="TOML file of hashed bearer tokens with scopes read, cas-write, ac-write "
        f"(see `slipstream token new`; or the text itself in ${TOKENS_ENV}); "
        "without one the server is open to everyone",
    )
    auth.add_argument(
        "--anonymous",
        choices=ANONYMOUS_MODES,
        help="what callers without a token may do when there is a token file: "
        "nothing (off, the default) or read",
    )
    auth.add_argument("--max-blob-size", metavar="SIZE", help="largest blob a caller may upload")
    auth.add_argument(
        "--max-batch-size", metavar="SIZE", help="largest batch read or write per call"
    )
    auth.add_argument(
        "--max-streams", metavar="N", type=int, help="calls in flight at once per caller"
    )
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain) of the server")
    tls.add_argument("--tls-key", metavar="FILE", help="PEM private key of the server")
    tls.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA bundle: require client certificates signed by it (mutual TLS)",
    )
    ops = p.add_argument_group("operations")
    ops.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics over HTTP here"
    )
    ops.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        help="also serve the gRPC health service, alone and without TLS, here (for probes)",
    )
    ops.add_argument(
        "--audit-log", metavar="FILE", help='append JSON lines of AC and layer writes ("-": stdout)'
    )
    ops.add_argument(
        "--ui-targets",
        metavar="BUILD,TEST,TOTAL",
        help="wall-time targets of the pipeline's stages the /ui/ pages show runs against "
        "(default 10m,20m,45m)",
    )
    ops.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text (default) or json lines"
    )


# ---- layering: file < environment < flags ----
@dataclass(frozen=True)
class _Setting:
    dest: str
    flag: str
    default: Any
    convert: Callable[[str], Any] | None
    choices: tuple[Any, ...] | None
    boolean: bool
    repeated: bool  # a flag given once per value: a TOML array, or words in the environment


def layered(parser: argparse.ArgumentParser) -> None:
    """Let the config file and environment fill in every option the command line leaves out.

    Call after all options are added. Options then parse to None when not given;
    `apply_layers` puts in the file, environment or original default value.
    """
    settings: dict[str, _Setting] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        boolean = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        repeated = isinstance(action, argparse._AppendAction)
        if not boolean and not repeated and not isinstance(action, argparse._StoreAction):
            continue
        settings[action.dest] = _Setting(
            action.dest,
            max(action.option_strings, key=len),
            action.default,
            action.type if callable(action.type) else None,
            tuple(action.choices) if action.choices is not None else None,
            boolean,
            repeated,
        )
        action.default = None
    parser.set_defaults(_layered_settings=settings)


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}".replace("-", "_")
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}_"))
        else:
            flat[name] = value
    return flat


def _convert(setting: _Setting, value: Any, where: str) -> Any:
    """A value from the file (any TOML type) or the environment (a string), checked."""
    if setting.repeated:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UsageError(f"{where}: expected a list of strings, got {value!r}")
        one = replace(setting, repeated=False)
        return [_convert(one, item, where) for item in value] or None
    if setting.boolean:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UsageError(f"{where}: expected a string or number, got {value!r}")
    if setting.convert is not None and isinstance(value, str):
        try:
            value = setting.convert(value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{where}: {value!r} is not valid ({exc})") from None
    elif setting.convert in (int, float) and isinstance(value, int | float):
        if setting.convert is int and not isinstance(value, int):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
    elif setting.convert is None:
        value = str(value)
    if setting.choices is not None and value not in setting.choices:
        choices = ", ".join(map(str, setting.choices))
        raise UsageError(f"{where}: {value!r} is not one of {choices}")
    return value


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return _flatten(tomllib.load(f))
    except OSError as exc:
        raise UsageError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: {exc}") from None


def apply_layers(args: argparse.Namespace, environ: dict[str, str] | None = None) -> None:
    """Fill in args from the config file and SLIPSTREAM_* variables; UsageError if invalid."""
    env = dict(os.environ if environ is None else environ)
    settings: dict[str, _Setting] = getattr(args, "_layered_settings", {})
    path = args.config if getattr(args, "config", None) else env.get(CONFIG_ENV)
    from_file = _read_config_file(path) if path else {}
    unknown = sorted(set(from_file) - set(settings))
    if unknown:
        raise UsageError(f"config file {path}: unknown setting {unknown[0]!r}")
    for dest, setting in settings.items():
        if getattr(args, dest, None) is not None:
            continue  # given on the command line
        env_name = ENV_PREFIX + dest.upper()
        if env.get(env_name, "") != "":
            raw = env[env_name]  # a repeated flag's values: words
            value = _convert(setting, raw.split() if setting.repeated else raw, env_name)
        elif dest in from_file:
            value = _convert(setting, from_file[dest], f"config file {path}: {dest}")
        else:
            value = setting.default
            if isinstance(value, str) and setting.convert is not None:
                value = setting.convert(value)
        setattr(args, dest, value)


# ---- the settings of this module, checked ----
def check_listen(value: str | None, flag: str) -> str | None:
    """A HOST:PORT to listen on (port 0 to 65535; 0 picks a free one); UsageError if not."""
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):
        raise UsageError(f"{flag} {value!r} is not HOST:PORT")
    if int(port) > 65535:
        raise UsageError(f"{flag} {value!r}: port {int(port)} is not in 0-65535")
    return value


def _size(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(str(value))
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _read(path: str, what: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if not args.tls_cert and not args.tls_key:
        if args.tls_client_ca:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    cert = _read(args.tls_cert, "--tls-cert")
    key = _read(args.tls_key, "--tls-key")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise UsageError(f"--tls-cert {args.tls_cert}: no PEM certificate in it")
    if b"PRIVATE KEY-----" not in key:
        raise UsageError(f"--tls-key {args.tls_key}: no PEM private key in it")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.tls_cert, args.tls_key)
    except ssl.SSLError as exc:
        raise UsageError(
            f"--tls-cert/--tls-key: the key does not fit the certificate or does not load ({exc})"
        ) from None
    ca = _read(args.tls_client_ca, "--tls-client-ca") if args.tls_client_ca else None
    if ca is not None and b"-----BEGIN CERTIFICATE-----" not in ca:
        raise UsageError(f"--tls-client-ca {args.tls_client_ca}: no PEM certificate in it")
    return TlsConfig(cert, key, ca)


def _tokens(args: argparse.Namespace, env: dict[str, str]) -> dict[str, TokenEntry] | None:
    if args.token_file:
        text = _read(args.token_file, "--token-file").decode("utf-8", errors="replace")
        source = f"token file {args.token_file}"
    elif env.get(TOKENS_ENV):
        text, source = env[TOKENS_ENV], f"${TOKENS_ENV}"
    else:
        return None
    try:
        return parse_tokens(text, source)
    except TokenFileError as exc:
        raise UsageError(str(exc)) from None


def ops_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> OpsConfig:
    """The checked OpsConfig from (layered) args; UsageError with one line if invalid."""
    env = dict(os.environ if environ is None else environ)
    tokens = _tokens(args, env)
    if args.anonymous is not None and tokens is None:
        raise UsageError(f"--anonymous needs a token file (--token-file or ${TOKENS_ENV})")
    if args.max_streams is not None and args.max_streams < 1:
        raise UsageError("--max-streams must be at least 1")
    limits = Limits(
        max_blob_size=_size(args.max_blob_size, "--max-blob-size"),
        max_batch_size=_size(args.max_batch_size, "--max-batch-size"),
        max_streams=args.max_streams,
    )
    if args.audit_log and args.audit_log != "-":
        try:
            with open(args.audit_log, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise UsageError(f"--audit-log {args.audit_log}: {exc.strerror or exc}") from None
    return OpsConfig(
        tokens=tokens,
        anonymous=args.anonymous or "off",
        limits=limits,
        tls=_tls(args),
        metrics_listen=check_listen(args.metrics_listen, "--metrics-listen"),
        health_listen=check_listen(args.health_listen, "--health-listen"),
        audit_log=args.audit_log,
        ui_targets=_ui_targets(args.ui_targets),
    )


def _ui_targets(text: str | None) -> tuple[float, float, float]:
    if text is None:
        return OpsConfig.ui_targets
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 3:
            raise ValueError("give three durations: BUILD,TEST,TOTAL (like 10m,20m,45m)")
        build, test, total = (parse_duration(p) for p in parts)
    except ValueError as exc:
        raise UsageError(f"--ui-targets {text!r}: {exc}") from None
    return build, test, total


def check_log_level(level: str) -> str:
    if level.upper() not in LEVELS:
        raise UsageError(f"--log-level {level!r} is not one of {', '.join(LEVELS)}")
    return level.upper()
