"""Server logging: plain text or JSON lines, each record tagged with the current call.

With --log-format json every record is one JSON object:

    {"time": "...", "level": "INFO", "logger": "cache_server.access",
     "message": "/build.bazel.../GetActionResult NOT_FOUND 1.2ms",
     "request_id": "3b1f...", "caller": "ci-main", "method": "/build.bazel.../GetActionResult",
     "grpc_code": "NOT_FOUND", "duration_ms": 1.2}

The request id is the client's `x-request-id` header if it sent one, else made
up per call; the access log (INFO on `cache_server.access`) has one line per call.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

from slipstream.cache_server.calls import current_call

LOG_FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_EXTRA_FIELDS = ("grpc_code", "duration_ms", "details")


class CallContext(logging.Filter):
    """Adds request_id, caller and method of the call being served (if any) to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = current_call()
        record.request_id = call.request_id if call else None
        caller = getattr(call.caller, "name", None) if call else None
        record.caller = caller
        record.method = call.method if call else None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # which worker, with `serve --workers N`
        }
        for key in ("request_id", "caller", "method", *_EXTRA_FIELDS):
            value = getattr(record, key, None)
            if value not in (None, ""):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [request {request_id}]" if request_id else text


def announce(line: str) -> None:
    """Print one of the server's own lines ("slipstream: ...") to stdout in one write:
    unbuffered (PYTHONUNBUFFERED), print's text and newline are two writes, and a log
    record written to stderr in between, into the same pipe, lands inside the line."""
    sys.stdout.write(f"slipstream: {line}\n")
    sys.stdout.flush()


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root logger; ValueError for an unknown level or format."""
    if level.upper() not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.addFilter(CallContext())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
