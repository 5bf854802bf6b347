"""ActionCache over a real socket, including the completeness check."""

from __future__ import annotations

import grpc
import pytest

from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.support.reapi import Reapi, digest, rpc_error
from tests.support.server_process import ServerProcess

ACTION = digest(b"an action")


@pytest.fixture
def server(any_store_server: ServerProcess) -> ServerProcess:
    return any_store_server


@pytest.fixture
def api(channel: grpc.Channel) -> Reapi:
    return Reapi(channel)


def _get(api: Reapi, action: re_pb2.Digest = ACTION, **kw: object) -> re_pb2.ActionResult:
    return api.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action, **kw))  # type: ignore[arg-type]


def _put(
    api: Reapi, result: re_pb2.ActionResult, action: re_pb2.Digest = ACTION, instance: str = ""
) -> None:
    api.ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(
            instance_name=instance, action_digest=action, action_result=result
        )
    )


def test_round_trip_and_inline(api: Reapi) -> None:
    out, stdout = b"output file", b"hello from the action\n"
    d_out, d_stdout = api.upload(out, stdout)
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="bin/out", digest=d_out, is_executable=True)],
        stdout_digest=d_stdout,
        exit_code=0,
    )
    _put(api, result)
    assert _get(api) == result
    inlined = _get(api, inline_stdout=True, inline_output_files=["bin/out"])
    assert inlined.stdout_raw == stdout
    assert inlined.output_files[0].contents == out


def test_unknown_action_is_not_found(api: Reapi) -> None:
    err = rpc_error(lambda: _get(api, digest(b"never run")))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_results_are_per_instance(api: Reapi) -> None:
    result = re_pb2.ActionResult(exit_code=3)
    _put(api, result, instance="linux/x86")
    got = api.ac.GetActionResult(
        re_pb2.GetActionResultRequest(instance_name="linux/x86", action_digest=ACTION)
    )
    assert got.exit_code == 3
    assert rpc_error(lambda: _get(api)).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("missing_part", ["output_file", "stdout", "stderr", "tree", "tree_file"])
def test_result_with_missing_blob_is_not_found(api: Reapi, missing_part: str) -> None:
    present, absent = b"present", b"absent: never uploaded"
    (d_present,) = api.upload(present)
    d_absent = digest(absent)
    tree_file = d_absent if missing_part == "tree_file" else d_present
    tree = re_pb2.Tree(root=re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=tree_file)]))
    tree_blob = tree.SerializeToString()
    if missing_part != "tree":
        api.upload(tree_blob)

    def pick(part: str) -> re_pb2.Digest:
        return d_absent if missing_part == part else d_present

    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="o", digest=pick("output_file"))],
        output_directories=[re_pb2.OutputDirectory(path="d", tree_digest=digest(tree_blob))],
        stdout_digest=pick("stdout"),
        stderr_digest=pick("stderr"),
    )
    action = digest(missing_part.encode())
    _put(api, result, action)
    err = rpc_error(lambda: _get(api, action))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "missing" in err.details() or "incomplete" in err.details()
    # Once the missing blob arrives, the result is served.
    api.upload(absent if missing_part != "tree" else tree_blob)
    assert _get(api, action) == result


def test_update_validates_digests(api: Reapi) -> None:
    bad = re_pb2.Digest(hash="nothex", size_bytes=1)
    err = rpc_error(
        lambda: api.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=bad, action_result=re_pb2.ActionResult())
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="x", digest=bad)])
    err = rpc_error(lambda: _put(api, result))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_read_only_ac_refuses_updates(tmp_path) -> None:
    server = ServerProcess(tmp_path / "ro", ["--read-only-ac"]).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            api = Reapi(ch)
            caps = api.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
            assert not caps.cache_capabilities.action_cache_update_capabilities.update_enabled
            err = rpc_error(lambda: _put(api, re_pb2.ActionResult()))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            api.upload(b"cas writes still work")
    finally:
        server.stop()
