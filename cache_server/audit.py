"""The audit log: one JSON line for every action-cache write and every layer-key write.

Those are the writes that are not self-verifying (a CAS blob is checked against
its digest, an action result or a layer key is taken on trust), so each attempt
is recorded, refused ones too:

    {"time": "2025-01-01T12:00:00.123456+00:00", "event": "ac_write",
     "caller": "ci-main", "authenticated": true, "peer": "ipv4:10.0.0.7:51234",
     "client_cert": "builder-3", "request_id": "5f2c...", "outcome": "OK",
     "instance": "linux", "action_digest": "ab12.../142"}

    {"time": ..., "event": "layer_write", ..., "key": "venv-linux-3f9a",
     "root_digest": "cd34.../88", "overwrite": false, "outcome": "ALREADY_EXISTS"}

A refused call also has "reason" (the status message). Token values never
appear: callers are named by their token file `name`. The file is opened for
appending ("-" means standard output) and each line is flushed as it is written.
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
from typing import Any, TextIO

import grpc

from slipstream.cache_server.auth import OPEN, Caller
from slipstream.cache_server.calls import Call, Hook

AC_WRITE = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult"
LAYER_WRITE = "/slipstream.layers.v1.Layers/PutLayer"


def _digest(d: Any) -> str:
    return f"{d.hash}/{d.size_bytes}"


class AuditLog(Hook):
    def __init__(self, path: str) -> None:
        self.path = path
        self._file: TextIO = (
            sys.stdout if path == "-" else open(path, "a", encoding="utf-8")  # noqa: SIM115
        )
        self._lock = threading.Lock()

    def end(self, call: Call) -> None:
        http: dict[str, Any] | None = call.notes.get("audit")  # set by an HTTP front end
        if http is not None:
            event = str(http["event"])
        elif call.method == AC_WRITE:
            event = "ac_write"
        elif call.method == LAYER_WRITE:
            event = "layer_write"
        else:
            return
        caller = call.caller if isinstance(call.caller, Caller) else OPEN
        record: dict[str, Any] = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(),
            "event": event,
            "protocol": call.protocol,
            "caller": caller.name,
            "authenticated": caller.authenticated,
            "peer": call.peer,
            "request_id": call.request_id,
            "outcome": call.code.name,
        }
        if http is not None:
            status = call.notes.get("http.status", 0)
            record.update(http, outcome="OK" if status < 300 else f"HTTP {status}")
            if status >= 300:
                record["reason"] = call.details
            self.write(record)
            return
        cert = call.client_cert_name()
        if cert is not None:
            record["client_cert"] = cert
        request = call.request
        if request is not None:
            if event == "ac_write":
                record["instance"] = request.instance_name
                record["action_digest"] = _digest(request.action_digest)
            else:
                record["key"] = request.key
                record["root_digest"] = _digest(request.root_digest)
                record["overwrite"] = request.overwrite
        if call.code is not grpc.StatusCode.OK:
            record["reason"] = call.details
        self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()
