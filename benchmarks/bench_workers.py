"""Scaling of `slipstream serve --workers N`: bench_cache's mixed load against one server
process, then against several worker processes, on the disk store.

    python -m benchmarks.bench_workers [--workers 1,2] [--rounds 3] [--clients 8]
        [--storage-dir DIR] [--json PATH]
    python -m benchmarks.bench_workers --smoke

One server per worker count, each on its own store under --storage-dir, all started
before the first round; the rounds then alternate between them (1, 2, 1, 2, ...),
so the load of a shared machine falls on both alike. Each figure is the median of
the rounds; the ratio is against the first worker count. The mixed load's clients
are separate processes, each with its own connection, which the kernel spreads over
the workers (SO_REUSEPORT hashes each connection to one). Beside the throughput it
tells the server's CPU time per operation (every server process, the supervisor's
share apart): what a core buys where cores are not shared with the clients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import tempfile
from collections.abc import Iterator

from benchmarks.bench_cache import (
    SMOKE,
    Row,
    Sizes,
    median_row,
    report,
    run_mixed,
    server_benchmark_parser,
)
from tests.support.proc_stats import cpu_seconds, with_children
from tests.support.server_process import ServerProcess


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user + system) so far of a server process and of the processes it
    started: (itself, the others). For --workers N, the supervisor and its workers."""
    own, *others = with_children(pid)
    return cpu_seconds(own), sum(map(cpu_seconds, others))


@dataclasses.dataclass
class _Cpu:
    server: float = 0.0  # CPU seconds of every server process
    supervisor: float = 0.0  # of those, the supervisor's (the accountant), with workers
    ops: int = 0


def _measured(server: ServerProcess, sizes: Sizes, cpu: _Cpu) -> Row:
    assert server.proc is not None
    before = _cpu_seconds(server.proc.pid)
    row = run_mixed(server.address, sizes)
    after = _cpu_seconds(server.proc.pid)
    cpu.server += sum(after) - sum(before)
    cpu.supervisor += after[0] - before[0]
    cpu.ops += row.count
    return row


@contextlib.contextmanager
def _servers(root: pathlib.Path, counts: list[int]) -> Iterator[dict[int, ServerProcess]]:
    servers: dict[int, ServerProcess] = {}
    try:
        for count in counts:
            store = root / f"store-{count}"
            servers[count] = ServerProcess(store, ["--workers", str(count)]).start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _worker_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--workers {text!r}: give worker counts like 1,2")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = server_benchmark_parser(__doc__)
    parser.add_argument(
        "--workers", default="1,2", help="worker counts to compare, comma-separated (default 1,2)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per worker count (default 3)")
    parser.add_argument(
        "--clients", type=int, help="client processes of the mixed load (default bench_cache's)"
    )
    args = parser.parse_args(argv)
    counts = _worker_counts(args.workers)
    sizes: Sizes = SMOKE if args.smoke else Sizes()
    if args.clients:
        sizes = dataclasses.replace(sizes, clients=args.clients)
    rounds = 1 if args.smoke else args.rounds
    results: dict[int, list[Row]] = {count: [] for count in counts}
    cpu = {count: _Cpu() for count in counts}
    with (
        tempfile.TemporaryDirectory(dir=args.storage_dir) as tmp,
        _servers(pathlib.Path(tmp), counts) as servers,
    ):
        for _ in range(rounds):
            for count, server in servers.items():
                results[count].append(_measured(server, sizes, cpu[count]))
    rows = []
    for count in counts:
        row = median_row(results[count])
        rows.append(dataclasses.replace(row, name=f"{row.name}, {count} worker(s)"))
    report(args, sizes, rows)
    base = rows[0].rate
    for count, row in zip(counts, rows, strict=True):
        used = cpu[count]
        per_op = used.server / used.ops * 1e6
        supervisor = (
            f", {used.supervisor / used.server:.0%} of it the supervisor's" if count > 1 else ""
        )
        print(
            f"{count} worker(s): {row.rate / base:.2f}x the throughput of {counts[0]}; "
            f"server CPU {per_op:.0f} us per operation{supervisor}"
        )
        if args.json:
            results_doc = json.loads(args.json.read_text())
            results_doc.setdefault("cpu", {})[str(count)] = dataclasses.asdict(used)
            args.json.write_text(json.dumps(results_doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
