"""Queue mode: runners of a run lease batches of tests until none are left. Pure.

The queue of a run is fixed when it is pinned: the units (tests that must run
together) from the longest to the shortest, cut into batches whose predicted work
shrinks toward the end (guided self-scheduling: a batch is filled up to the remaining
work over ``factor`` x runners, and at least MIN_BATCH_SECONDS). Everything else is
a set of immutable records, each created once (create-if-absent):

- a lease ``BBBBBB.AAA`` (batch, attempt) with its tests, runner, deadline and a
  secret: the lease id handed to the runner is ``BBBBBB.AAA.SECRET``, and only that
  id completes it (record keys stay ``BBBBBB.AAA``, so a race for a lease is still
  one create-if-absent);
- completions, each naming its lease and the tests it finished with their times.

``next_lease`` reads those and decides what to hand out next; losing the race to
create that lease record just means reading again. So replicas sharing a store
agree, a runner that dies loses nothing (its lease expires and goes back to the
queue), and a test completed twice counts once.
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from slipstream.splitter.algorithm import Unit, plan_hash
from slipstream.splitter.history import Sample

RECORD_VERSION = 1
QUEUE_NAMESPACE = "splitqueue"
DEFAULT_FACTOR = 2.0
MIN_BATCH_SECONDS = 0.5  # below this a lease round trip is a noticeable overhead
MAX_ATTEMPTS = 3  # a batch leased this often without completing is abandoned
DEFAULT_LEASE_SECONDS = 120.0  # plus PREDICTED_MARGIN x the batch's predicted time
PREDICTED_MARGIN = 3.0
MIN_LEASE_SECONDS = 1.0
MAX_LEASE_SECONDS = 6 * 3600.0
MAX_WAIT = 2.0  # longest retry_after handed to an idle runner
MIN_WAIT = 0.1


@dataclass(frozen=True, slots=True)
class Batch:
    index: int
    tests: tuple[str, ...]  # in unit order: the longest units first
    predicted: float


def order_units(units: Iterable[Unit]) -> list[Unit]:
    """Longest first; ties by id, so every server orders alike."""
    return sorted(units, key=lambda u: (-u.weight, u.id))


def batch_target(remaining: float, runners: int, factor: float, min_seconds: float) -> float:
    """The predicted work a batch is filled up to: a share of what is left."""
    return max(remaining / (factor * runners), min_seconds)


def make_batches(
    units: Iterable[Unit],
    runners: int,
    *,
    factor: float = DEFAULT_FACTOR,
    min_seconds: float = MIN_BATCH_SECONDS,
) -> list[Batch]:
    """Cut the units, longest first, into batches of shrinking predicted work.

    Batch k takes the next unit, then more while its work stays within the target
    ``batch_target(work left, ...)``, which never grows. Units are never cut, so a
    batch's work is at most max(its target, its first unit).
    """
    if runners < 1:
        raise ValueError("runners must be at least 1")
    ordered = order_units(units)
    remaining = math.fsum(u.weight for u in ordered)
    batches: list[Batch] = []
    i = 0
    while i < len(ordered):
        target = batch_target(remaining, runners, factor, min_seconds)
        tests = list(ordered[i].tests)
        work = ordered[i].weight
        i += 1
        while i < len(ordered) and work + ordered[i].weight <= target:
            tests.extend(ordered[i].tests)
            work += ordered[i].weight
            i += 1
        batches.append(Batch(len(batches), tuple(tests), work))
        remaining -= work
    return batches


@dataclass(frozen=True, slots=True)
class QueuePlan:
    """The pinned queue of one run."""

    run_key: str
    runners: int
    batches: tuple[Batch, ...]
    plan_hash: str
    tests_digest: str

    def all_tests(self) -> set[str]:
        return {t for b in self.batches for t in b.tests}

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "version": RECORD_VERSION,
                "run_key": self.run_key,
                "runners": self.runners,
                "batches": [[list(b.tests), b.predicted] for b in self.batches],
                "plan_hash": self.plan_hash,
                "tests_digest": self.tests_digest,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> QueuePlan:
        try:
            raw = json.loads(data)
            if raw.get("version") != RECORD_VERSION:
                raise ValueError(f"queue record version {raw.get('version')!r}")
            return cls(
                run_key=str(raw["run_key"]),
                runners=int(raw["runners"]),
                batches=tuple(
                    Batch(i, tuple(str(t) for t in tests), float(p))
                    for i, (tests, p) in enumerate(raw["batches"])
                ),
                plan_hash=str(raw["plan_hash"]),
                tests_digest=str(raw["tests_digest"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"unreadable queue record: {exc}") from None


def make_queue(run_key: str, units: Iterable[Unit], runners: int, tests_digest: str) -> QueuePlan:
    batches = make_batches(units, runners)
    return QueuePlan(
        run_key, runners, tuple(batches), plan_hash([b.tests for b in batches]), tests_digest
    )


_SECRET_BYTES = 18  # 24 URL-safe characters


def new_secret() -> str:
    """The unguessable part of a lease id."""
    return secrets.token_urlsafe(_SECRET_BYTES)


def lease_name(batch: int, attempt: int) -> str:
    """The record name of a lease: which batch, which attempt."""
    return f"{batch:06d}.{attempt:03d}"


def parse_lease_id(text: str) -> tuple[str, str] | None:
    """(record name, secret) of a lease id as handed out; None if it is not one."""
    name, dot, secret = text.rpartition(".")
    batch, dot2, attempt = name.partition(".")
    if not (dot and dot2 and batch.isdigit() and attempt.isdigit() and secret):
        return None
    if len(batch) != 6 or len(attempt) != 3 or len(secret) > 64:
        return None
    return name, secret


@dataclass(frozen=True, slots=True)
class Lease:
    batch: int
    attempt: int
    tests: tuple[str, ...]
    runner: str
    granted: float  # server time, seconds since the epoch
    deadline: float
    secret: str = ""

    @property
    def name(self) -> str:
        return lease_name(self.batch, self.attempt)

    @property
    def id(self) -> str:
        """What the runner holding the lease is given, and completes it with."""
        return f"{self.name}.{self.secret}"

    def matches(self, secret: str) -> bool:
        return bool(self.secret) and hmac.compare_digest(self.secret, secret)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "version": RECORD_VERSION,
                "batch": self.batch,
                "attempt": self.attempt,
                "tests": list(self.tests),
                "runner": self.runner,
                "granted": self.granted,
                "deadline": self.deadline,
                "secret": self.secret,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease:
        try:
            raw = json.loads(data)
            return cls(
                int(raw["batch"]),
                int(raw["attempt"]),
                tuple(str(t) for t in raw["tests"]),
                str(raw["runner"]),
                float(raw["granted"]),
                float(raw["deadline"]),
                str(raw["secret"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"unreadable lease record: {exc}") from None


@dataclass(frozen=True, slots=True)
class Completion:
    lease: str  # the lease's record name (BBBBBB.AAA), never its secret
    runner: str
    results: dict[str, Sample] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "version": RECORD_VERSION,
                "lease": self.lease,
                "runner": self.runner,
                "results": {t: [s.seconds, s.failed] for t, s in sorted(self.results.items())},
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Completion:
        try:
            raw = json.loads(data)
            return cls(
                str(raw["lease"]),
                str(raw["runner"]),
                {str(t): Sample(float(v[0]), bool(v[1])) for t, v in raw["results"].items()},
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ValueError(f"unreadable completion record: {exc}") from None


def completed_results(completions: Iterable[Completion]) -> dict[str, Sample]:
    """Each completed test once: the first completion (in lease order) wins."""
    out: dict[str, Sample] = {}
    for c in sorted(completions, key=lambda c: c.lease):
        for test, sample in c.results.items():
            out.setdefault(test, sample)
    return out


@dataclass(frozen=True, slots=True)
class Grant:
    """Create this lease (batch, attempt) of these tests."""

    batch: int
    attempt: int
    tests: tuple[str, ...]
    predicted: float


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to hand out now: leases are outstanding; ask again after ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Finished:
    """Every test completed, except ``abandoned`` (leased MAX_ATTEMPTS times)."""

    abandoned: tuple[str, ...] = ()


Decision = Grant | Wait | Finished


def latest_leases(leases: Iterable[Lease]) -> dict[int, Lease]:
    """Batch -> its lease with the highest attempt."""
    latest: dict[int, Lease] = {}
    for lease in leases:
        old = latest.get(lease.batch)
        if old is None or lease.attempt > old.attempt:
            latest[lease.batch] = lease
    return latest


def next_lease(
    plan: QueuePlan,
    leases: Iterable[Lease],
    completed: Mapping[str, object] | set[str],
    now: float,
    *,
    max_attempts: int = MAX_ATTEMPTS,
) -> Decision:
    """What to hand out next.

    1. An expired lease with tests not completed, lowest batch first: a new attempt
       of those tests (batches come longest first, so this keeps longest-first);
       after ``max_attempts`` its tests are abandoned instead.
    2. Else the first batch never leased (its completed tests left out).
    3. Else wait for the earliest outstanding deadline, or finish.
    """
    latest = latest_leases(leases)
    outstanding: list[float] = []
    for batch in sorted(latest):
        lease = latest[batch]
        left = tuple(t for t in lease.tests if t not in completed)
        if not left:
            continue
        if lease.deadline > now:
            outstanding.append(lease.deadline)
        elif lease.attempt + 1 < max_attempts:
            predicted = plan.batches[batch].predicted * len(left) / max(1, len(lease.tests))
            return Grant(batch, lease.attempt + 1, left, predicted)
    for b in plan.batches:
        if b.index in latest:
            continue
        left = tuple(t for t in b.tests if t not in completed)
        if left:
            return Grant(b.index, 0, left, b.predicted * len(left) / len(b.tests))
    if outstanding:
        return Wait(min(MAX_WAIT, max(MIN_WAIT, min(outstanding) - now)))
    return Finished(abandoned_tests(leases, completed, now, max_attempts=max_attempts))


def abandoned_tests(
    leases: Iterable[Lease],
    completed: Mapping[str, object] | set[str],
    now: float,
    *,
    max_attempts: int = MAX_ATTEMPTS,
) -> tuple[str, ...]:
    """Tests whose last allowed lease expired before they completed."""
    out: list[str] = []
    for lease in latest_leases(leases).values():
        if lease.deadline <= now and lease.attempt + 1 >= max_attempts:
            out.extend(t for t in lease.tests if t not in completed)
    return tuple(sorted(out))


def lease_seconds(requested: float, predicted: float) -> float:
    """The lease timeout: as requested (clamped), else a default from the prediction."""
    if requested > 0:
        return min(MAX_LEASE_SECONDS, max(MIN_LEASE_SECONDS, requested))
    return min(MAX_LEASE_SECONDS, DEFAULT_LEASE_SECONDS + PREDICTED_MARGIN * predicted)


@dataclass(frozen=True, slots=True)
class QueueCounts:
    tests: int
    completed: int
    leased: int
    pending: int
    leases: int


def counts(
    plan: QueuePlan, leases: Sequence[Lease], completed: Mapping[str, object], now: float
) -> QueueCounts:
    """How many tests are completed, in live leases, or pending."""
    every = plan.all_tests()
    done = every & set(completed)
    live = {
        t for lease in latest_leases(leases).values() if lease.deadline > now for t in lease.tests
    }
    leased = len((live & every) - done)
    return QueueCounts(len(every), len(done), leased, len(every) - len(done) - leased, len(leases))
