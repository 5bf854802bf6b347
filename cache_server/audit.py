"""The audit log: one JSON line for every write that is not self-verifying.

Those are the action-cache and layer-key writes (a CAS blob is checked against its
digest, an action result or a layer key is taken on trust) and the split service's
writes, which steer what CI runs: timings uploads, a plan or a queue pinned, a queue
lease completed. Each attempt is recorded, refused ones too:

    {"time": "2025-01-01T12:00:00.123456+00:00", "event": "ac_write",
     "caller": "ci-main", "authenticated": true, "peer": "ipv4:10.0.0.7:51234",
     "client_cert": "builder-3", "request_id": "5f2c...", "outcome": "OK",
     "instance": "linux", "action_digest": "ab12.../142"}

    {"time": ..., "event": "layer_write", ..., "key": "venv-linux-3f9a",
     "root_digest": "cd34.../88", "overwrite": false, "outcome": "ALREADY_EXISTS"}

    {"time": ..., "event": "split_complete", ..., "suite": "unit", "run_key": "4711",
     "lease": "000003.001", "runner": "shard 2 (host pid 9)", "results": 12}

The split events are "timings_upload" (suite, run_id, tests), "split_plan" and
"split_queue" (suite, run_key, total, tests, plan_hash; only calls that pinned, or
were refused) and "split_complete" (never the lease's secret). A refused call also
has "reason" (the status message). Token values never
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
_SPLIT = "/slipstream.split.v1.Split/"
# Split methods that write, by their event name.
SPLIT_WRITES = {
    f"{_SPLIT}UploadTimings": "timings_upload",
    f"{_SPLIT}GetShard": "split_plan",
    f"{_SPLIT}JoinQueue": "split_queue",
    f"{_SPLIT}Complete": "split_complete",
}
# Those that write only when they pin (the first caller of a run); the others read.
_WRITE_WHEN_PINNED = frozenset({"split_plan", "split_queue"})


def _digest(d: Any) -> str:
    return f"{d.hash}/{d.size_bytes}"


def _split_fields(event: str, request: Any, response: Any) -> dict[str, Any]:
    """What a split write's audit line says about it (requests as received: any text)."""
    if event == "timings_upload":  # the first message of the stream names the run
        fields = {"suite": request.suite[:100], "run_id": request.run_id[:500]}
        if response is not None:
            fields["tests"] = response.tests
        return fields
    if event == "split_complete":
        name, _, _ = request.lease_id.rpartition(".")  # never the secret
        return {
            "suite": request.suite[:100],
            "run_key": request.run_key[:500],
            "lease": name[:20],
            "runner": request.runner[:200],
            "results": len(request.results),
        }
    run = request.run
    fields = {
        "suite": run.suite[:100],
        "run_key": run.run_key[:500],
        "total": run.total,
        "tests": len(run.test_ids),
    }
    if response is not None:
        fields["plan_hash"] = response.plan_hash
    return fields


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
        elif call.method in SPLIT_WRITES:
            event = SPLIT_WRITES[call.method]
            ok = call.code is grpc.StatusCode.OK
            if event in _WRITE_WHEN_PINNED and ok and not call.response.pinned_now:
                return
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
            elif event == "layer_write":
                record["key"] = request.key
                record["root_digest"] = _digest(request.root_digest)
                record["overwrite"] = request.overwrite
            else:
                record.update(_split_fields(event, request, call.response))
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
