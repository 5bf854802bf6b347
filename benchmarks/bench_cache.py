"""Cache server benchmark: the same REAPI workload against a running server.

    python -m benchmarks.bench_cache [--smoke] [--json results.json] [--storage-dir DIR]

Starts `slipstream serve` on the disk store (in a temp dir under --storage-dir;
/dev/shm gives steadier figures than a shared disk), then measures:
  - BatchUpdateBlobs of 4 KiB blobs (blobs/s)
  - FindMissingBlobs of 1,000 digests, half present (calls/s)
  - BatchReadBlobs of 4 KiB blobs (blobs/s)
  - one 64 MiB ByteStream write and read (MB/s)
  - SHA-256 on one core in this process (MB/s), the ceiling for a verifying write
The workload is a function of a server address, so peers can run the same one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import grpc
from slipstream_protos import bytestream_pb2 as bs_pb2
from slipstream_protos import bytestream_pb2_grpc as bs_grpc
from slipstream_protos import remote_execution_pb2 as re_pb2
from slipstream_protos import remote_execution_pb2_grpc as re_grpc

from tests.server_process import ServerProcess


@dataclass(frozen=True)
class Sizes:
    small_blobs: int = 20_000
    small_size: int = 4096
    batch: int = 500
    find_calls: int = 50
    find_digests: int = 1000
    stream_mib: int = 64


SMOKE = Sizes(small_blobs=200, batch=100, find_calls=3, find_digests=100, stream_mib=2)


@dataclass
class Row:
    name: str
    count: int
    seconds: float
    unit: str

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else float("inf")


def _digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sha256_rate(mib: int) -> Row:
    data = os.urandom(mib << 20)
    seconds = _timed(lambda: hashlib.sha256(data).digest())
    return Row("sha256 one core", mib, seconds, "MiB/s")


def run_workload(address: str, sizes: Sizes) -> list[Row]:
    """The REAPI workload against the server at address; one row per operation."""
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    with grpc.insecure_channel(address, options=options) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        bytestream = bs_grpc.ByteStreamStub(channel)
        blobs = [os.urandom(sizes.small_size) for _ in range(sizes.small_blobs)]
        digests = [_digest(b) for b in blobs]
        batches = [
            list(zip(digests[i : i + sizes.batch], blobs[i : i + sizes.batch], strict=True))
            for i in range(0, len(blobs), sizes.batch)
        ]

        def upload() -> None:
            for batch in batches:
                cas.BatchUpdateBlobs(
                    re_pb2.BatchUpdateBlobsRequest(
                        requests=[
                            re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b)
                            for d, b in batch
                        ]
                    )
                )

        rows = [Row("BatchUpdateBlobs 4 KiB", len(blobs), _timed(upload), "blobs/s")]

        half = sizes.find_digests // 2
        query = digests[:half] + [_digest(os.urandom(32)) for _ in range(sizes.find_digests - half)]

        def find() -> None:
            for _ in range(sizes.find_calls):
                resp = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=query))
                assert len(resp.missing_blob_digests) == sizes.find_digests - half

        name = f"FindMissingBlobs {sizes.find_digests} digests"
        rows.append(Row(name, sizes.find_calls, _timed(find), "calls/s"))

        def read() -> None:
            for batch in batches:
                resp = cas.BatchReadBlobs(
                    re_pb2.BatchReadBlobsRequest(digests=[d for d, _ in batch])
                )
                assert all(r.status.code == 0 for r in resp.responses)

        rows.append(Row("BatchReadBlobs 4 KiB", len(blobs), _timed(read), "blobs/s"))

        big = os.urandom(sizes.stream_mib << 20)
        d = _digest(big)
        chunk = 1 << 20

        def requests() -> Iterator[bs_pb2.WriteRequest]:
            name = f"uploads/bench/blobs/{d.hash}/{d.size_bytes}"
            for i in range(0, len(big), chunk):
                yield bs_pb2.WriteRequest(
                    resource_name=name if i == 0 else "",
                    write_offset=i,
                    data=big[i : i + chunk],
                    finish_write=i + chunk >= len(big),
                )

        def write() -> None:
            assert bytestream.Write(requests()).committed_size == len(big)

        def stream_read() -> None:
            req = bs_pb2.ReadRequest(resource_name=f"blobs/{d.hash}/{d.size_bytes}")
            assert sum(len(r.data) for r in bytestream.Read(req)) == len(big)

        rows.append(
            Row(
                f"ByteStream write {sizes.stream_mib} MiB", sizes.stream_mib, _timed(write), "MiB/s"
            )
        )
        rows.append(
            Row(
                f"ByteStream read {sizes.stream_mib} MiB",
                sizes.stream_mib,
                _timed(stream_read),
                "MiB/s",
            )
        )
    return rows


def machine() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, to check the benchmark runs"
    )
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    parser.add_argument(
        "--storage-dir",
        type=pathlib.Path,
        default=pathlib.Path("/dev/shm") if pathlib.Path("/dev/shm").is_dir() else None,
        help="where the server's store goes (default /dev/shm, a tmpfs)",
    )
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    rows = [sha256_rate(sizes.stream_mib)]
    with tempfile.TemporaryDirectory(dir=args.storage_dir) as tmp:
        server = ServerProcess(pathlib.Path(tmp) / "store").start()
        try:
            rows += run_workload(server.address, sizes)
        finally:
            server.stop()
    print(f"{'operation':<36} {'rate':>14}  unit")
    for row in rows:
        print(f"{row.name:<36} {row.rate:>14,.1f}  {row.unit}")
    if args.json:
        results = {
            "machine": machine(),
            "storage_dir": str(args.storage_dir),
            "sizes": asdict(sizes),
            "rows": [{**asdict(r), "rate": r.rate} for r in rows],
        }
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
