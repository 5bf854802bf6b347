"""Cache server benchmark over S3: the bench_cache workload against moto on loopback.

    python -m benchmarks.bench_s3 [--smoke] [--json results.json]

Runs `slipstream serve --storage s3://...` with and without the disk tier,
behind a pass-through proxy that counts the S3 requests (by HTTP method), and
reports them next to the blobs/s and MB/s rows of benchmarks/bench_cache.py.
moto is far slower than S3 per request, so read the rates as a lower bound and
the request counts as the figure that carries over.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import asdict

import boto3

from benchmarks.bench_cache import SMOKE, Sizes, run_workload
from tests.s3.conftest import AWS_ENV, server_args
from tests.s3.fault_proxy import FaultProxy
from tests.server_process import ServerProcess


def _moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/data.json", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes(small_blobs=4000, clients=4, mixed_ops=100)
    os.environ.update(AWS_ENV)
    moto, url = _moto()
    proxy = FaultProxy(int(url.rsplit(":", 1)[1])).start()
    results = []
    try:
        for mode in ("s3", "disk+s3"):
            bucket = f"bench-{mode.replace('+', '-')}-{os.getpid()}"
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
            with tempfile.TemporaryDirectory() as tmp:
                extra = ["--cache-dir", tmp, "--cache-size", "4G"] if mode != "s3" else []
                server = ServerProcess(f"s3://{bucket}", server_args(proxy.url, *extra)).start()
                proxy.requests.clear()
                try:
                    rows = run_workload(server.address, sizes)
                finally:
                    server.stop()
            requests = dict(proxy.requests)
            results.append({"mode": mode, "rows": [asdict(r) for r in rows], "s3": requests})
            print(f"--- {mode}: S3 requests for the whole workload {requests}")
            for row in rows:
                print(f"{row.name:<36} {row.rate:>14,.1f}  {row.unit}")
    finally:
        proxy.close()
        moto.terminate()
        moto.wait(10)
    if args.json:
        args.json.write_text(json.dumps({"sizes": asdict(sizes), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
