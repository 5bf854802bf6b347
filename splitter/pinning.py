"""Plans pinned per run, and the split used when the server cannot be reached: pure.

The split service pins the first caller's plan for (owner, suite, run key, total)
as a record created only if absent, so every runner of the run, a retried job and
other replicas all answer from the same plan. The owner is the caller's token name:
a run belongs to the token that made it, so another token cannot pin or steer it.
A runner whose collected tests differ from the pinned plan's is refused with
``mismatch`` rather than given a shard that would skip or double tests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import xxhash

from slipstream.splitter.algorithm import (
    GRANULARITIES,
    Check,
    Granularity,
    Plan,
    no_check,
    plan_hash,
    split_tests,
)
from slipstream.splitter.history import Estimates

RECORD_VERSION = 1
PLAN_NAMESPACE = "splitplans"
MAX_RUN_KEY_CHARS = 500
# The most test ids one run (a plan, a queue, an upload of timings) may hold: the
# work and memory of planning grow with it (~1 KiB and ~25 us per test).
MAX_RUN_TESTS = 200_000
_EXAMPLES = 3


class PinError(ValueError):
    """A request the service must refuse (bad suite, run key, total, index)."""


def run_slug(suite: str, run_key: str, owner: str) -> str:
    """The record-key prefix of a run: the suite, then a digest of the owner (the
    caller's name) and the run key (any text)."""
    if not run_key or len(run_key) > MAX_RUN_KEY_CHARS:
        raise PinError(f"the run key must be 1 to {MAX_RUN_KEY_CHARS} characters")
    named = f"{owner}\n{run_key}".encode("utf-8", "surrogatepass")
    return f"{suite}/{hashlib.sha256(named).hexdigest()[:32]}"


def plan_key(slug: str, total: int) -> str:
    """The record key of a run's plan for total shards, from the run's slug."""
    return f"{slug}/{total}"


def ids_digest(tests: Iterable[str]) -> str:
    """A hash of a set of test ids (order and repeats do not matter)."""
    h = xxhash.xxh128()
    lines = sorted(dict.fromkeys(tests))  # sorted(set()), in O(n) when tests are sorted
    if lines:  # one update of the lines hashes as one update per line does
        h.update(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def check_request(total: int, index: int, granularity: str) -> Granularity:
    """Raise PinError for a bad total, index or granularity; the granularity to use."""
    if total < 1 or total > 10_000:
        raise PinError(f"total must be 1 to 10000, not {total}")
    if not 0 <= index < total:
        raise PinError(f"index must be from 0 to {total - 1}, not {index}")
    chosen = granularity or "auto"
    if chosen not in GRANULARITIES:
        raise PinError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    return chosen  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class PinnedPlan:
    """The plan of one run as stored: each shard's tests and predicted seconds."""

    run_key: str
    total: int
    shards: tuple[tuple[str, ...], ...]
    predicted: tuple[float, ...]
    makespan: float
    plan_hash: str
    tests_digest: str
    from_history: bool

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "version": RECORD_VERSION,
                "run_key": self.run_key,
                "total": self.total,
                "shards": [list(s) for s in self.shards],
                "predicted": list(self.predicted),
                "makespan": self.makespan,
                "plan_hash": self.plan_hash,
                "tests_digest": self.tests_digest,
                "from_history": self.from_history,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PinnedPlan:
        try:
            raw = json.loads(data)
            if raw.get("version") != RECORD_VERSION:
                raise ValueError(f"plan record version {raw.get('version')!r}")
            return cls(
                run_key=str(raw["run_key"]),
                total=int(raw["total"]),
                shards=tuple(tuple(str(t) for t in s) for s in raw["shards"]),
                predicted=tuple(float(p) for p in raw["predicted"]),
                makespan=float(raw["makespan"]),
                plan_hash=str(raw["plan_hash"]),
                tests_digest=str(raw["tests_digest"]),
                from_history=bool(raw["from_history"]),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable plan record: {exc}") from None

    def all_tests(self) -> set[str]:
        return {t for s in self.shards for t in s}


def make_plan(
    run_key: str,
    tests: Collection[str],
    total: int,
    estimates: Estimates,
    granularity: Granularity = "auto",
    groups: Mapping[str, str] | None = None,
    check: Check = no_check,
) -> PinnedPlan:
    """The plan to pin: ``split_tests`` over the collected tests' estimates; ``check``
    as in ``split_tests``."""
    wanted = dict.fromkeys(sorted(tests))  # in order: the splitter's sorts are then O(n)
    plan: Plan = split_tests(
        {t: estimates.tests.get(t, 1.0) for t in wanted},
        total,
        granularity,
        file_costs=estimates.file_costs,
        groups={t: g for t, g in (groups or {}).items() if t in wanted},
        startup=estimates.startup,
        check=check,
    )
    check()
    return PinnedPlan(
        run_key=run_key,
        total=total,
        shards=tuple(s.tests for s in plan.shards),
        predicted=tuple(s.predicted for s in plan.shards),
        makespan=plan.makespan,
        plan_hash=plan.plan_hash,
        tests_digest=ids_digest(wanted),
        from_history=estimates.from_history,
    )


def mismatch(planned: Collection[str], collected: Collection[str], what: str) -> str | None:
    """None when the sets agree; else one line saying how they differ, with examples."""
    plan_set, got = set(planned), set(collected)
    if plan_set == got:
        return None
    missing = sorted(plan_set - got)
    extra = sorted(got - plan_set)
    parts = []
    if missing:
        parts.append(f"{len(missing)} planned but not collected here (e.g. {_examples(missing)})")
    if extra:
        parts.append(f"{len(extra)} collected here but not planned (e.g. {_examples(extra)})")
    return (
        f"this runner collected {len(got)} tests, {what} has {len(plan_set)}: "
        + "; ".join(parts)
        + ". Every runner of a run must collect the same tests (same code, same options)"
    )


def _examples(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_EXAMPLES])
    return shown + (", ..." if len(ids) > _EXAMPLES else "")


def hash_shard(test: str, total: int, groups: Mapping[str, str] | None = None) -> int:
    """The fallback shard of a test: xxhash of its id (of its group's name, if grouped)."""
    key = (groups or {}).get(test)
    name = f"group:{key}" if key is not None else test
    return xxhash.xxh64_intdigest(name.encode("utf-8", "surrogatepass")) % total


def fallback_shard(
    tests: Iterable[str],
    index: int,
    total: int,
    *,
    estimates: Estimates | None = None,
    granularity: Granularity = "auto",
    groups: Mapping[str, str] | None = None,
) -> tuple[list[str], str]:
    """This runner's tests and the plan hash when the server is unreachable.

    From timings when given (every runner with the same file computes the same
    plan), else the hash split. Both depend only on the tests, total and the
    timings, so runners that all fell back partition the tests between them.
    """
    wanted = sorted(set(tests))
    if estimates is not None and estimates.from_history:
        plan = make_plan("", wanted, total, estimates, granularity, groups)
        return list(plan.shards[index]), plan.plan_hash
    shards: list[list[str]] = [[] for _ in range(total)]
    for t in wanted:
        shards[hash_shard(t, total, groups)].append(t)
    return shards[index], plan_hash(shards)
