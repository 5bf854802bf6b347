"""What syncing acknowledged writes costs: the disk store with fsync (the default) and
with --no-fsync, side by side on the same disk, measured in turns.

    python -m benchmarks.bench_fsync [--smoke] [--json results.json] [--storage-dir DIR]
                                     [--rounds N]

Starts two `slipstream serve` on the disk store under --storage-dir (default /var/tmp,
which should be a real disk: on a RAM filesystem the store syncs nothing and the two
match), then runs BatchUpdateBlobs of 4 KiB blobs (500 per call) and one ByteStream
write on each, the order flipping every round; each figure is the median of its rounds,
and fsync / no-fsync is the median of each round's ratio (the two measured back to back
meet the same load on a shared disk, where figures minutes apart differ by 5x).
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile

from benchmarks.bench_cache import (
    Row,
    Sizes,
    Workload,
    median_row,
    report,
    server_benchmark_parser,
)
from slipstream.cache_server.storage.disk import filesystem_type
from tests.support.server_process import ServerProcess

SIZES = Sizes(small_blobs=1_000, batch=500, stream_mib=32)
SMOKE = Sizes(small_blobs=100, batch=50, stream_mib=2)
MODES = {"fsync": [], "no-fsync": ["--no-fsync"]}


def run(storage_dir: pathlib.Path, sizes: Sizes, rounds: int) -> list[Row]:
    """Rows for each mode and operation, then the on/off ratio of each operation."""
    with tempfile.TemporaryDirectory(dir=storage_dir) as tmp:
        servers = {m: ServerProcess(pathlib.Path(tmp) / m, a).start() for m, a in MODES.items()}
        try:
            workloads = {m: Workload(s.address, sizes) for m, s in servers.items()}
            measured: dict[tuple[str, str], list[Row]] = {}
            for turn in range(rounds):
                order = list(MODES) if turn % 2 == 0 else list(reversed(MODES))
                for op in ("batch_update", "stream_write"):
                    for mode in order:
                        row = getattr(workloads[mode], op)()
                        measured.setdefault((op, mode), []).append(row)
            for workload in workloads.values():
                workload.close()
        finally:
            for server in servers.values():
                server.stop()
    rows = []
    for (_op, mode), runs in measured.items():
        row = median_row(runs)
        row.name = f"{row.name}, {mode}"
        rows.append(row)
    for op in ("batch_update", "stream_write"):
        on, off = (measured[(op, mode)] for mode in MODES)
        ratios = [a.rate / b.rate for a, b in zip(on, off, strict=True)]
        ratio = statistics.median(ratios)
        row = Row(f"{on[0].name}, fsync / no-fsync", 1, 1 / ratio, "x (ratio of rates)")
        row.rounds = [round(r, 3) for r in ratios]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = server_benchmark_parser(__doc__)
    parser.set_defaults(storage_dir=pathlib.Path("/var/tmp"))
    parser.add_argument("--rounds", type=int, default=7, help="rounds per mode (default 7)")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else SIZES
    print(f"stores under {args.storage_dir}, on {filesystem_type(args.storage_dir)}")
    rows = run(args.storage_dir, sizes, 1 if args.smoke else args.rounds)
    report(args, sizes, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
