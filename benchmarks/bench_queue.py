"""Queue mode against the static split when the real durations differ from the history.

    python -m benchmarks.bench_queue [--smoke] [--json PATH]

A simulation on a virtual clock, driven by the real scheduler functions
(``splitter.queue.make_queue`` / ``next_lease``, ``splitter.algorithm.split_tests``):
no processes, no sockets. The history predicts each test's time; the real time is
that times lognormal noise, times the speed of the runner that runs it (runners of
uneven speed). Each lease costs a round trip (``--rtt``). The static split runs the
plan made from the history; queue mode leases batches until the queue is empty.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
from dataclasses import asdict, dataclass

from benchmarks.bench_split import synthetic_suite
from slipstream.splitter.algorithm import build_units, split_tests
from slipstream.splitter.history import Sample
from slipstream.splitter.pinning import ids_digest
from slipstream.splitter.queue import Completion, Finished, Lease, Wait, make_queue, next_lease

HERE = pathlib.Path(__file__).parent


@dataclass
class Row:
    scenario: str
    tests: int
    runners: int
    noise_sigma: float
    speeds: str
    static_makespan: float
    queue_makespan: float
    lower_bound: float  # all real work spread perfectly over the runners' speeds
    static_ratio: float
    queue_ratio: float
    leases: int
    speedup: float  # static / queue


def simulate_queue(
    history: dict[str, float], real: dict[str, float], speeds: list[float], rtt: float
) -> tuple[float, int]:
    """Makespan and number of leases of queue mode; runners poll while others work."""
    n = len(speeds)
    plan = make_queue("bench", build_units(history, n, "test"), n, ids_digest(history))
    free = [0.0] * n
    active = set(range(n))
    leases: list[Lease] = []
    completions: list[Completion] = []
    done: dict[str, Sample] = {}
    finish = [0.0] * n
    while active:
        r = min(active, key=lambda k: (free[k], k))
        now = free[r] + rtt
        decision = next_lease(plan, leases, done, now)
        if isinstance(decision, Finished):
            active.discard(r)
            continue
        if isinstance(decision, Wait):
            free[r] = now + decision.seconds
            continue
        lease = Lease(decision.batch, decision.attempt, decision.tests, str(r), now, math.inf)
        leases.append(lease)
        end = now + speeds[r] * math.fsum(real[t] for t in decision.tests) + rtt
        results = {t: Sample(real[t], False) for t in decision.tests}
        completions.append(Completion(lease.id, str(r), results))
        done.update(results)  # completed as of now: the simulation orders events by time
        free[r] = finish[r] = end
    return max(finish), len(leases)


def run_scenario(
    name: str, tests: int, speeds: list[float], sigma: float, seed: int, rtt: float
) -> Row:
    history, _ = synthetic_suite(tests, seed)
    history = {t: max(s, 0.001) for t, s in history.items()}
    rng = random.Random(seed * 7919)
    real = {t: s * rng.lognormvariate(0.0, sigma) for t, s in history.items()}
    plan = split_tests(history, len(speeds), "test")
    static = max(
        speeds[s.index] * math.fsum(real[t] for t in s.tests) for s in plan.shards if s.tests
    )
    queue, leases = simulate_queue(history, real, speeds, rtt)
    longest = max(real.values()) * min(speeds)
    bound = max(math.fsum(real.values()) / sum(1 / v for v in speeds), longest)
    return Row(
        name,
        tests,
        len(speeds),
        sigma,
        ",".join(f"{v:g}" for v in speeds),
        round(static, 2),
        round(queue, 2),
        round(bound, 2),
        round(static / bound, 3),
        round(queue / bound, 3),
        leases,
        round(static / queue, 3),
    )


def scenarios(smoke: bool) -> list[tuple[str, int, list[float], float]]:
    if smoke:
        return [("noise", 200, [1.0] * 4, 0.5), ("one-slow", 200, [1, 1, 1, 2.0], 0.2)]
    n = 8
    return [
        ("history-exact", 2000, [1.0] * n, 0.0),
        ("noise-0.3", 2000, [1.0] * n, 0.3),
        ("noise-0.8", 2000, [1.0] * n, 0.8),
        ("one-runner-2x-slow", 2000, [1.0] * (n - 1) + [2.0], 0.3),
        ("speeds-0.7-1.5", 2000, [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5], 0.3),
        ("big-noise+speeds", 5000, [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5], 0.8),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--json", type=pathlib.Path, default=HERE / "queue_results.json")
    parser.add_argument("--rtt", type=float, default=0.005, help="seconds per lease round trip")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per scenario (median)")
    args = parser.parse_args(argv)
    seeds = 1 if args.smoke else args.seeds
    rows: list[Row] = []
    for name, tests, speeds, sigma in scenarios(args.smoke):
        runs = [run_scenario(name, tests, speeds, sigma, s + 1, args.rtt) for s in range(seeds)]
        rows.append(sorted(runs, key=lambda r: r.speedup)[len(runs) // 2])  # the median
    print(
        f"{'scenario':<22} {'tests':>6} {'N':>3} {'sigma':>5} {'static':>9} {'queue':>9} "
        f"{'bound':>9} {'st/bd':>6} {'q/bd':>6} {'leases':>6} {'speedup':>7}"
    )
    for r in rows:
        print(
            f"{r.scenario:<22} {r.tests:>6} {r.runners:>3} {r.noise_sigma:>5} "
            f"{r.static_makespan:>8.2f}s {r.queue_makespan:>8.2f}s {r.lower_bound:>8.2f}s "
            f"{r.static_ratio:>6.3f} {r.queue_ratio:>6.3f} {r.leases:>6} {r.speedup:>7.3f}"
        )
    print("simulated on a virtual clock with the real scheduler functions; median of seeds")
    result = {"smoke": args.smoke, "rtt": args.rtt, "rows": [asdict(r) for r in rows]}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
