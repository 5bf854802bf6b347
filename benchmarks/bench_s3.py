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
import tempfile
from dataclasses import asdict

from benchmarks.bench_cache import SMOKE, Sizes, print_rows, run_workload
from tests.support.fault_proxy import FaultProxy
from tests.support.moto import AWS_ENV, make_buckets, moto_server, server_args
from tests.support.server_process import ServerProcess


def _run_mode(mode: str, url: str, proxy: FaultProxy, sizes: Sizes) -> dict[str, object]:
    """The workload through a server on a fresh bucket; its rows and S3 request counts."""
    bucket = f"bench-{mode.replace('+', '-')}-{os.getpid()}"
    make_buckets(url, bucket)
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--cache-dir", tmp, "--cache-size", "4G"] if mode != "s3" else []
        server = ServerProcess(f"s3://{bucket}", server_args(proxy.url, *extra)).start()
        proxy.requests.clear()
        try:
            rows = run_workload(server.address, sizes)
        finally:
            server.stop()
    requests = dict(proxy.requests)
    print(f"--- {mode}: S3 requests for the whole workload {requests}")
    print_rows(rows)
    return {"mode": mode, "rows": [asdict(r) for r in rows], "s3": requests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes(small_blobs=4000, clients=4, mixed_ops=100)
    os.environ.update(AWS_ENV)
    results = []
    with moto_server() as url:
        proxy = FaultProxy(int(url.rsplit(":", 1)[1])).start()
        try:
            for mode in ("s3", "disk+s3"):
                results.append(_run_mode(mode, url, proxy, sizes))
        finally:
            proxy.close()
    if args.json:
        args.json.write_text(json.dumps({"sizes": asdict(sizes), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
