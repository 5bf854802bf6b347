"""Splitting tests into shards that finish together: pure functions, no I/O.

A shard's wall time is modelled as: start-up, plus the cost of every file it touches
(collection, module/class fixtures), plus its tests. ``build_units`` groups tests into
units that must share a shard (a class, an xdist group, a whole file, a chunk of a big
file); ``split`` assigns units to shards:

1. LPT: units from longest to shortest, each to the least-loaded shard. Units are
   ordered by (weight, xxhash of id, id), a total order, so input order never matters.
2. Karmarkar-Karp differencing as well when shards hold few units, and branch and
   bound (capped by a node count) for tiny inputs; the best wins.
3. A move/swap pass between the fullest shard and the others, capped by an iteration
   count (never by wall-clock time, so every runner computes the same plan).

Memory and work stay about linear in units + shards: differencing, whose partial
partitions hold a list per shard for every unit, runs only while units x shards is
below _DIFFERENCING_MAX_CELLS. A caller that must be able to give up (a server
answering a call with a deadline) passes ``check``, called now and then, which stops
the split by raising.

Weights are balanced as integer microseconds, so the arithmetic is exact and the same
on every machine.
"""

from __future__ import annotations

import bisect
import collections
import functools
import heapq
import itertools
import math
import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, TypeVar

import xxhash

from slipstream.splitter.ids import class_of, files_of

Granularity = Literal["auto", "test", "class", "file"]
GRANULARITIES: tuple[Granularity, ...] = ("auto", "test", "class", "file")
DEFAULT_MAX_ITERATIONS = 2000
# Differencing beats LPT when shards hold few units; above this many per shard LPT
# plus the improvement pass is already within a fraction of a percent.
_DIFFERENCING_UNITS_PER_SHARD = 20
# ...and only while units x shards stays below this: its memory grows with both.
_DIFFERENCING_MAX_CELLS = 1_000_000
# Branch and bound for tiny inputs, capped by a node count (never by time).
_EXACT_MAX_UNITS = 16
_EXACT_NODE_LIMIT = 50_000
_SCALE = 1_000_000  # seconds to integer microseconds
# An auto plan this close to its lower bound is kept without trying finer units.
_AUTO_GOOD_ENOUGH = 0.01
# Single tests (classes cut apart) must beat auto's file-based plan by this much:
# a class's fixtures then run in several shards, a cost no estimate includes.
_CUT_CLASSES_GAIN = 0.02
# Steps of a long loop between two calls of the caller's check.
_CHECK_EVERY = 4096

Check = Callable[[], None]
X = TypeVar("X")


def no_check() -> None:
    """The default check: never stops a split."""


def _checking(items: Iterable[X], check: Check) -> Iterator[X]:
    """items, with check() called before every _CHECK_EVERY of them."""
    return itertools.chain.from_iterable(_chunks(items, check))  # no Python step per item


def _chunks(items: Iterable[X], check: Check) -> Iterator[list[X]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, _CHECK_EVERY)):
        check()
        yield chunk


def _grouped(
    tests: Sequence[str], key: Callable[[str], str | None], check: Check
) -> list[tuple[str, ...]]:
    """The components of "same key" over sorted tests (None: alone), as the union-find
    gives them (each sorted, the list sorted), without one."""
    alone: list[tuple[str, ...]] = []
    by_key: dict[str, list[str]] = {}
    for t in _checking(tests, check):
        k = key(t)
        if k is None:
            alone.append((t,))
        else:
            got = by_key.get(k)
            if got is None:
                by_key[k] = [t]
            else:
                got.append(t)
    alone.extend(tuple(g) for g in by_key.values())
    alone.sort()
    return alone


class Unit(NamedTuple):
    """Tests that run in the same shard; ``weight`` is what the balancing sees.

    A tuple: a split by test makes one per test (a frozen dataclass takes three times
    as long to make).
    """

    tests: tuple[str, ...]  # sorted
    files: tuple[str, ...]  # sorted, distinct
    test_time: float  # predicted seconds of the tests alone
    weight: float  # test_time plus the share of file costs this unit carries

    @property
    def id(self) -> str:
        return self.tests[0]


# The fields by position: a unit's fields read in C, faster than by name.
_tests = operator.itemgetter(0)
_files = operator.itemgetter(1)
_test_time = operator.itemgetter(2)
_weight = operator.itemgetter(3)
_first = operator.itemgetter(0)
_encode = functools.partial(str.encode, encoding="utf-8", errors="surrogatepass")
_SIXTY_FOURS = itertools.repeat(64)
_SCALES = itertools.repeat(_SCALE)
# Unit(*fields) without the Python frame of a named tuple's __new__: for map().
_make_unit = functools.partial(tuple.__new__, Unit)


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    tests: tuple[str, ...]  # sorted
    files: tuple[str, ...]  # sorted
    predicted: float  # seconds: start-up + file costs + tests


@dataclass(frozen=True, slots=True)
class Plan:
    """A split: the shards, the lower bound on any split's makespan, and a hash."""

    shards: tuple[Shard, ...]
    makespan: float
    lower_bound: float
    ratio: float  # makespan / lower_bound, 1.0 when both are zero
    plan_hash: str
    method: str  # "lpt", "differencing" or "exact", plus "+improved" when the pass helped

    def shard_of(self) -> dict[str, int]:
        """Test id to shard index."""
        return {t: s.index for s in self.shards for t in s.tests}


class _UnionFind:
    def __init__(self, items: Iterable[str], check: Check = no_check) -> None:
        self.parent = {item: item for item in items}
        self.check = check

    def find(self, item: str) -> str:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller id becomes the root: the result does not depend on call order.
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo

    def union_by(self, items: Iterable[str], key: Mapping[str, str | None]) -> None:
        first: dict[str, str] = {}
        for step, item in enumerate(items):
            if step % _CHECK_EVERY == 0:
                self.check()
            k = key.get(item)
            if k is not None:
                self.union(first.setdefault(k, item), item)

    def components(self) -> list[tuple[str, ...]]:
        groups: dict[str, list[str]] = {}
        for step, item in enumerate(self.parent):
            if step % _CHECK_EVERY == 0:
                self.check()
            groups.setdefault(self.find(item), []).append(item)
        return sorted(tuple(sorted(g)) for g in groups.values())


def _unit(
    tests: Sequence[str], times: Mapping[str, float], file_of_test: Mapping[str, str], extra: float
) -> Unit:
    if len(tests) == 1:  # the common case, kept cheap for 100,000-test suites
        t = tests[0]
        return Unit((t,), (file_of_test[t],), times[t], times[t] + extra)
    ordered = tuple(sorted(tests))
    test_time = math.fsum(times[t] for t in ordered)
    files = tuple(sorted({file_of_test[t] for t in ordered}))
    return Unit(ordered, files, test_time, test_time + extra)


def _files_cost(files: Collection[str], fcosts: Mapping[str, float]) -> float:
    """math.fsum of the files' costs (faster for one file: fsum(x) is x + 0.0)."""
    if len(files) == 1:
        for f in files:
            return fcosts.get(f, 0.0) + 0.0
    return math.fsum(fcosts.get(f, 0.0) for f in files)


def build_units(
    times: Mapping[str, float],
    n: int,
    granularity: Granularity = "auto",
    *,
    file_costs: Mapping[str, float] | None = None,
    groups: Mapping[str, str] | None = None,
    granules_per_shard: int = 1,
    check: Check = no_check,
) -> list[Unit]:
    """Group tests (id -> predicted seconds) into the units ``split`` balances.

    ``groups`` (test id -> group name, e.g. an xdist_group mark) always stay together.
    ``test`` and ``class`` units carry an equal share of their files' costs; ``file``
    units carry their files' costs. ``auto`` keeps each file whole unless it is longer
    than total/n, and cuts those files into the fewest chunks that fit, each chunk
    paying the file cost once. With ``granules_per_shard`` k > 1, ``auto`` cuts files
    longer than total/(k*n) too, where importing the file again costs less than half
    such a piece: finer units for balance, at the price of more imports. ``check`` as
    in ``split_tests``.
    """
    check()
    return _build_units(
        times,
        _files_of(times, check),
        n,
        granularity,
        file_costs or {},
        groups,
        granules_per_shard,
        check,
    )


def _files_of(times: Mapping[str, float], check: Check) -> dict[str, str]:
    """Each test's file, the tests sorted."""
    return dict(zip(*_tests_and_files(times, check), strict=True))


def _tests_and_files(times: Mapping[str, float], check: Check) -> tuple[list[str], list[str]]:
    """The tests, sorted, and each one's file: one string per distinct file, so each
    file is hashed once however many sets and dicts it goes in, and two of one file
    compare by identity."""
    tests = list(times)
    if not all(map(operator.lt, tests, itertools.islice(tests, 1, None))):  # in C
        tests.sort()
    check()
    one_of_each: dict[str, str] = {}
    files = list(map(one_of_each.setdefault, *itertools.tee(files_of(tests))))
    check()
    return tests, files


def _build_units(
    times: Mapping[str, float],
    file_of_test: Mapping[str, str],
    n: int,
    granularity: Granularity,
    fcosts: Mapping[str, float],
    groups: Mapping[str, str] | None,
    granules_per_shard: int,
    check: Check,
) -> list[Unit]:
    """build_units, given ``_files_of(times)``: made once for the several unit sets of
    one split."""
    if n < 1:
        raise ValueError("the number of shards must be at least 1")
    tests = list(file_of_test)
    atoms: list[tuple[str, ...]] | None
    if granularity == "test" and not groups:
        atoms = [(t,) for t in tests]
    elif granularity == "auto" and not groups:
        atoms = None  # a file's classes are found only if the file is cut (few are)
    elif granularity == "file" and not groups:
        atoms = _file_wholes(file_of_test, check)
    elif not groups:  # one relation: grouping by its key gives its components
        atoms = _grouped(tests, class_of, check)
    else:
        uf = _UnionFind(tests, check)
        if groups:
            uf.union_by(tests, groups)
        if granularity in ("class", "auto"):
            uf.union_by(tests, {t: class_of(t) for t in _checking(tests, check)})
        if granularity == "file":
            uf.union_by(tests, file_of_test)
        atoms = uf.components()
    check()
    if granularity == "auto":
        return _auto_units(
            atoms, times, file_of_test, n, fcosts, groups or {}, granules_per_shard, check
        )
    assert atoms is not None
    if granularity == "file":
        return [
            _unit(a, times, file_of_test, _files_cost({file_of_test[t] for t in a}, fcosts))
            for a in _checking(atoms, check)
        ]
    if granularity == "test" and not groups:
        return _single_test_units(tests, times, file_of_test, fcosts, check)
    # Single tests (most atoms) skip the sets: their one file is file_of_test's.
    atom_files = [
        None if len(a) == 1 else {file_of_test[t] for t in a} for a in _checking(atoms, check)
    ]
    sharing = collections.Counter(  # how many atoms each file's cost is shared by
        file_of_test[a[0]] for a, fs in zip(atoms, atom_files, strict=True) if fs is None
    )
    for fs in atom_files:
        if fs is not None:
            sharing.update(fs)
    share_of = {f: fcosts[f] / count if f in fcosts else 0.0 for f, count in sharing.items()}
    one_file = {f: (f,) for f in sharing}  # one (f,) per file, shared by its tests' units
    units: list[Unit] = []
    for a, maybe_fs in _checking(zip(atoms, atom_files, strict=True), check):
        if maybe_fs is None:  # _unit and _files_cost of one test, inlined
            t = a[0]
            f = file_of_test[t]
            seconds = times[t]
            units.append(Unit(a, one_file[f], seconds, seconds + share_of[f]))
            continue
        share = _files_cost(maybe_fs, {f: share_of[f] for f in maybe_fs if f in fcosts})
        units.append(_unit(a, times, file_of_test, share))
    return units


def _single_test_units(
    tests: list[str],
    times: Mapping[str, float],
    file_of_test: Mapping[str, str],
    fcosts: Mapping[str, float],
    check: Check,
) -> list[Unit]:
    """The units of a split by test without groups, one per test (in the tests' order,
    each with an equal share of its file's cost), made in C loops: what the loop of
    ``_build_units`` makes of single tests."""
    files = list(file_of_test.values())  # in the tests' order
    sharing = collections.Counter(files)  # how many tests each file's cost is shared by
    share_of = {f: fcosts[f] / count if f in fcosts else 0.0 for f, count in sharing.items()}
    one_file = {f: (f,) for f in sharing}  # one (f,) per file, shared by its tests' units
    seconds = list(map(times.__getitem__, tests))
    check()
    fields = zip(
        zip(tests),  # (t,) each
        map(one_file.__getitem__, files),
        seconds,
        map(operator.add, seconds, map(share_of.__getitem__, files)),
        strict=True,
    )
    return list(_checking(map(_make_unit, fields), check))


def _file_wholes(file_of_test: Mapping[str, str], check: Check) -> list[tuple[str, ...]]:
    """``_grouped(tests, file_of_test.get)`` for sorted tests: each file's tests, the
    files in the order of their first test. A file's tests, sorted, mostly come one
    after another: then they are cut where the file changes (found in C), else grouped."""
    tests = list(file_of_test)
    files = list(file_of_test.values())
    check()
    starts = [0, *itertools.compress(range(1, len(files)), map(operator.ne, files[1:], files))]
    if len(starts) != len(set(files)):  # a file's tests apart (a "[" in a path)
        return _grouped(tests, file_of_test.get, check)
    ends = [*starts[1:], len(tests)]
    return [tuple(tests[a:b]) for a, b in zip(starts, ends, strict=True)] if tests else []


def _auto_units(
    atoms: list[tuple[str, ...]] | None,
    times: Mapping[str, float],
    file_of_test: Mapping[str, str],
    n: int,
    fcosts: Mapping[str, float],
    groups: Mapping[str, str],
    granules_per_shard: int,
    check: Check,
) -> list[Unit]:
    # Whole files, merged where a group spans files.
    atoms_of: dict[str, list[tuple[str, ...]]] | None = None  # each whole's atoms
    if groups:
        assert atoms is not None
        uf = _UnionFind(file_of_test, check)
        for step, atom in enumerate(atoms):
            if step % _CHECK_EVERY == 0:
                check()
            for t in atom[1:]:
                uf.union(atom[0], t)
        uf.union_by(file_of_test, file_of_test)
        wholes = uf.components()
        atoms_of = {}
        for atom in atoms:
            atoms_of.setdefault(uf.find(atom[0]), []).append(atom)
    else:  # the wholes are the files; a file's atoms, its classes, found if it is cut
        wholes = _file_wholes(file_of_test, check)
    total = math.fsum(times.values()) + _files_cost(set(file_of_test.values()), fcosts)
    target = total / n
    granule = target / granules_per_shard
    units: list[Unit] = []
    for whole in wholes:
        check()
        # Without groups a whole is one file's tests, sorted: its file is its first's.
        files = (file_of_test[whole[0]],) if not groups else {file_of_test[t] for t in whole}
        fcost = _files_cost(files, fcosts)
        tests_time = math.fsum(map(times.__getitem__, whole))
        cheap_to_cut = fcost <= granule / 2
        limit = granule if cheap_to_cut else target
        if tests_time + fcost <= limit or len(whole) == 1:
            if groups or len(whole) == 1:
                units.append(_unit(whole, times, file_of_test, fcost))
            else:  # _unit's, without sorting and adding up again
                units.append(_make_unit((whole, files, tests_time, tests_time + fcost)))
            continue
        # Without groups: the classes of the file's tests (sorted), as _grouped over all
        # the tests gives them for this file.
        pieces = (
            _grouped(whole, class_of, check) if atoms_of is None else atoms_of[uf.find(whole[0])]
        )
        shard_room = max(target - fcost, tests_time / n)
        room = granule - fcost if cheap_to_cut and granule < target else shard_room
        if any(math.fsum(times[t] for t in p) > shard_room for p in pieces):
            # A class too long for one shard: only explicit groups still bind.
            sub = _UnionFind(whole)
            sub.union_by(whole, groups)
            pieces = sub.components()
        needed = math.ceil(tests_time / room) if room > 0 else len(pieces)  # room: may underflow
        k = max(1, min(len(pieces), granules_per_shard * n, needed))
        for chunk in _lpt_chunks(pieces, times, file_of_test, k):
            chunk_cost = _files_cost({file_of_test[t] for t in chunk}, fcosts)
            units.append(_unit(chunk, times, file_of_test, chunk_cost))
    return units


def _lpt_chunks(
    pieces: Sequence[tuple[str, ...]],
    times: Mapping[str, float],
    file_of_test: Mapping[str, str],
    k: int,
) -> list[list[str]]:
    units = [_unit(p, times, file_of_test, 0.0) for p in pieces]
    unit_weights = [_int_weight(u.weight) for u in units]
    order = _order([u.id for u in units], unit_weights)
    bins = _lpt([unit_weights[i] for i in order], range(len(order)), k)
    chunks: list[list[str]] = [[] for _ in range(k)]
    for r, b in enumerate(bins):
        chunks[b].extend(units[order[r]].tests)
    return [c for c in chunks if c]


def _int_weight(seconds: float) -> int:
    return max(0, round(seconds * _SCALE))


def _order(ids: Sequence[str], weights: Sequence[int]) -> list[int]:
    """Unit indices (given each unit's id) from heaviest to lightest, ties broken by a
    hash of the id, then the id."""
    if len(ids) != len(weights):
        raise ValueError("a weight per unit")
    # (-weight, hash) as one int, -weight * 2**64 + hash: the same order, sorted faster;
    # made in C loops: (-w << 64) | xxh64(id encoded) for each unit
    hashes = map(xxhash.xxh64_intdigest, _encoded(list(ids)))
    keys = list(
        map(operator.or_, map(operator.lshift, map(operator.neg, weights), _SIXTY_FOURS), hashes)
    )
    if len(set(keys)) < len(keys):  # a hash collision: the id decides
        return sorted(range(len(ids)), key=lambda i: (keys[i], ids[i]))
    return sorted(range(len(ids)), key=keys.__getitem__)


def _encoded(ids: list[str], piece: int = _CHECK_EVERY) -> Iterable[bytes]:
    """Each id encoded as UTF-8 with surrogates passed through: a piece of ids at a
    time joined, encoded and cut again, which costs two thirds of encoding each (its
    keyword arguments, parsed 100,000 times); one by one in a piece with a line break
    in an id."""
    pieces = (ids[i : i + piece] for i in range(0, len(ids), piece))
    return itertools.chain.from_iterable(map(_encoded_piece, pieces))


def _encoded_piece(ids: list[str]) -> Iterable[bytes]:
    joined = "\n".join(ids)
    if joined.count("\n") != len(ids) - 1:
        return map(_encode, ids)
    return _encode(joined).split(b"\n")


def _lpt(
    weights: Sequence[int], order: Sequence[int], n: int, check: Check = no_check
) -> list[int]:
    return _lpt_and_loads(weights, order, n, check)[0]


def _lpt_and_loads(
    weights: Sequence[int], order: Sequence[int], n: int, check: Check = no_check
) -> tuple[list[int], list[int]]:
    """LPT's assignment and the shards' loads it ends with (read off its heap)."""
    assign = [0] * len(weights)
    # (load, shard) as one int, load * n + shard: the same order, compared faster
    heap = list(range(n))
    replace_top = heapq.heapreplace
    scaled = list(map(operator.mul, weights, itertools.repeat(n)))  # each weight * n, in C
    for chunk in _chunks(order, check):  # check() per chunk, not a test per unit
        for i in chunk:
            top = heap[0]
            assign[i] = top % n
            replace_top(heap, top + scaled[i])
    loads = [0] * n
    for key in heap:
        loads[key % n] = key // n
    return assign, loads


def _differencing(
    weights: Sequence[int], order: Sequence[int], n: int, check: Check = no_check
) -> list[int]:
    """Multiway Karmarkar-Karp: merge the two partial partitions with the largest spread."""
    # A partial partition: (-(spread), tie, sums sorted descending, unit lists alongside).
    heap: list[tuple[int, int, list[int], list[list[int]]]] = []
    for rank, i in enumerate(order):
        sums = [weights[i]] + [0] * (n - 1)
        heap.append((-weights[i], rank, sums, [[i]] + [[] for _ in range(n - 1)]))
    heapq.heapify(heap)
    tie = len(order)
    while len(heap) > 1:
        check()
        _, _, sa, la = heapq.heappop(heap)
        _, _, sb, lb = heapq.heappop(heap)
        # Largest sums of one with the smallest of the other.
        pairs = sorted(
            ((sa[j] + sb[n - 1 - j], la[j] + lb[n - 1 - j]) for j in range(n)),
            key=lambda p: -p[0],
        )
        sums = [p[0] for p in pairs]
        low = sums[-1]
        heapq.heappush(
            heap, (-(sums[0] - low), tie, [x - low for x in sums], [p[1] for p in pairs])
        )
        tie += 1
    assign = [0] * len(weights)
    if heap:
        for s, members in enumerate(heap[0][3]):
            for i in members:
                assign[i] = s
    return assign


def _exact(
    weights: Sequence[int], n: int, beat: int, node_limit: int, check: Check = no_check
) -> list[int] | None:
    """Branch and bound over units in rank order: an assignment with makespan below
    ``beat`` if one is found within ``node_limit`` nodes, else None."""
    m = len(weights)
    bound = max(math.ceil(sum(weights) / n), max(weights, default=0))
    loads = [0] * n
    assign = [0] * m
    best: list[int] | None = None
    best_makespan = beat
    nodes = 0

    def dfs(i: int) -> None:
        nonlocal best, best_makespan, nodes
        nodes += 1
        if nodes % _CHECK_EVERY == 0:
            check()
        if i == m:
            best, best_makespan = assign[:], max(loads)
            return
        tried: set[int] = set()
        for s in range(n):
            load = loads[s]
            # Shards with equal loads are interchangeable: try one of them.
            if load in tried or load + weights[i] >= best_makespan:
                continue
            tried.add(load)
            loads[s] += weights[i]
            assign[i] = s
            dfs(i + 1)
            loads[s] -= weights[i]
            if best_makespan <= bound or nodes >= node_limit:
                return

    dfs(0)
    return best


def _improve(
    weights: Sequence[int],
    assign: list[int],
    n: int,
    floor: int,
    max_iterations: int,
    check: Check = no_check,
    known_loads: Sequence[int] | None = None,
) -> bool:
    """Moves and swaps out of the fullest shard while they lower it; True if any helped.

    Each look at a (fullest, other) pair of shards counts as one iteration. The
    shards are kept sorted by (load, index), so a round costs a look-up, not a sort.
    ``known_loads``, the shards' loads if known, spares the pass over the units that
    finds them when no shard is above the floor.
    """
    if known_loads is not None and (
        max(known_loads) <= floor or _no_exchange(weights, max(known_loads) - min(known_loads))
    ):
        return False
    members = _grouped_by_shard(range(len(assign)), assign, n)
    weight_of = weights.__getitem__
    loads = [sum(map(weight_of, m)) for m in members]
    if max(loads) <= floor:
        return False
    # Each shard's (weight, unit) sorted, made when the pass first looks at the shard.
    bins: list[list[tuple[int, int]] | None] = [None] * n

    def bin_of(s: int) -> list[tuple[int, int]]:
        got = bins[s]
        if got is None:
            got = bins[s] = sorted(zip(map(weight_of, members[s]), members[s]))  # noqa: B905
        return got

    ranked = sorted((loads[s], s) for s in range(n))
    improved = False
    iterations = 0
    while iterations < max_iterations:
        check()
        # The fullest shard; of equally full ones, the lowest index.
        top_load = ranked[-1][0]
        top = ranked[bisect.bisect_left(ranked, (top_load, -1))][1]
        if top_load <= floor:
            break
        found = False
        for other_load, other in ranked:
            if other == top or iterations >= max_iterations:
                continue
            iterations += 1
            gap = top_load - other_load
            if gap <= 1:
                break
            top_bin, other_bin = bin_of(top), bin_of(other)
            best = _best_exchange(top_bin, other_bin, gap)
            if best is None:
                continue
            a, b = best
            delta = a[0] - (b[0] if b else 0)
            top_bin.remove(a)
            bisect.insort(other_bin, a)
            assign[a[1]] = other
            if b is not None:
                other_bin.remove(b)
                bisect.insort(top_bin, b)
                assign[b[1]] = top
            for s, change in ((top, -delta), (other, delta)):
                del ranked[bisect.bisect_left(ranked, (loads[s], s))]
                loads[s] += change
                bisect.insort(ranked, (loads[s], s))
            found = improved = True
            break
        if not found:
            break
    return improved


def _no_exchange(weights: Sequence[int], widest_gap: int) -> bool:
    """True when no move or swap can change two shards' loads by d with 0 < d < gap for
    any gap up to widest_gap: every unit's weight and every difference of two weights
    is 0 or at least widest_gap (as when times are whole milliseconds). Then the
    improvement pass finds nothing, and need not sort every shard's units to see it."""
    distinct = sorted(set(weights))
    positive = distinct[1:] if distinct[:1] == [0] else distinct
    if not positive:
        return True  # no unit weighs anything: nothing to move
    smallest_step = min(map(operator.sub, distinct[1:], distinct), default=widest_gap)
    return smallest_step >= widest_gap and positive[0] >= widest_gap


def _best_exchange(
    top: list[tuple[int, int]], other: list[tuple[int, int]], gap: int
) -> tuple[tuple[int, int], tuple[int, int] | None] | None:
    """The move (a, None) or swap (a, b) whose weight change d is closest to gap/2, 0 < d < gap."""
    other_weights = list(map(_first, other))
    best: tuple[tuple[int, int], tuple[int, int] | None] | None = None
    best_dist = gap  # |2d - gap| must beat this: any 0 < d < gap qualifies
    last = 0  # weights are never negative: a first weight of 0 is passed over too
    for a in top:
        wa = a[0]
        if wa == last:  # 0, or as the unit before: that one's candidates, which won ties
            continue
        last = wa
        if 0 < wa < gap and abs(2 * wa - gap) < best_dist:
            best, best_dist = (a, None), abs(2 * wa - gap)
        j = bisect.bisect_left(other_weights, wa - gap // 2)
        for k in (j - 1, j):
            if 0 <= k < len(other):
                d = wa - other_weights[k]
                if 0 < d < gap and abs(2 * d - gap) < best_dist:
                    best, best_dist = (a, other[k]), abs(2 * d - gap)
        if best_dist <= 1:
            break
    return best


def _makespan(weights: Sequence[int], assign: Sequence[int], n: int) -> int:
    return max(map(sum, _grouped_by_shard(weights, assign, n)))


def _grouped_by_shard(items: Iterable[X], assign: Iterable[int], n: int) -> list[list[X]]:
    """Each shard's items, in their order (item i in shard assign[i]): appended in C."""
    groups: list[list[X]] = [[] for _ in range(n)]
    collections.deque(map(list.append, map(groups.__getitem__, assign), items), maxlen=0)
    return groups


def lower_bound(
    units: Sequence[Unit], n: int, file_costs: Mapping[str, float], startup: float
) -> float:
    """start-up + max(everything / n, the longest unit with its files' costs)."""
    files = set(itertools.chain.from_iterable(map(_files, units)))
    total = math.fsum(map(_test_time, units)) + math.fsum(
        map(file_costs.get, files, itertools.repeat(0.0))
    )
    # Each unit's test_time + _files_cost(files), the cost once per distinct files
    # (units of one file share the tuple), added in C.
    cost_of = {fs: _files_cost(fs, file_costs) for fs in set(map(_files, units))}
    longest = max(
        map(operator.add, map(_test_time, units), map(cost_of.__getitem__, map(_files, units))),
        default=0.0,
    )
    return startup + max(total / n, longest)


def _single_test_bound(
    seconds: Sequence[float],
    files: Sequence[str],
    n: int,
    file_costs: Mapping[str, float],
    startup: float,
    check: Check,
) -> float:
    """``lower_bound`` of the units of ``build_units(times, n, "test")`` (no groups: one
    test each, its predicted seconds and its file), without making them."""
    if not seconds:
        return 0.0
    distinct_files = set(files)
    total = math.fsum(seconds) + math.fsum(file_costs.get(f, 0.0) for f in distinct_files)
    # + 0.0: what fsum of the one file cost gives (-0.0 becomes 0.0); each file's once,
    # and each test's time plus its file's added in C
    cost_of = {f: file_costs.get(f, 0.0) + 0.0 for f in distinct_files}
    check()
    longest: float = max(map(operator.add, seconds, map(cost_of.__getitem__, files)))
    return startup + max(total / n, longest)


def plan_hash(shards: Sequence[Sequence[str]]) -> str:
    """A short hash of which tests go to which shard; every runner prints it."""
    h = xxhash.xxh64()
    h.update(f"{len(shards)}\n".encode())
    for index, tests in enumerate(shards):
        h.update(f"#{index}\n".encode())
        if tests:  # one update of the lines hashes as one update per line does
            h.update(("\n".join(sorted(tests)) + "\n").encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _shard(index: int, units: list[Unit], fcosts: Mapping[str, float], startup: float) -> Shard:
    """The shard of units (in input order, which the sum of their times follows)."""
    # The units' fields, each in one tuple (a pass over the units, in C).
    tests: Sequence[tuple[str, ...]] = ()
    unit_files: Sequence[tuple[str, ...]] = ()
    times: Sequence[float] = ()
    if units:
        tests, unit_files, times, _ = zip(*units, strict=True)
    # In the units' order, which is about sorted: sorting them is then about linear.
    return _shard_of(
        index,
        tuple(sorted(itertools.chain.from_iterable(tests))),
        dict.fromkeys(itertools.chain.from_iterable(unit_files)),
        times,
        fcosts,
        startup,
    )


def _shard_of(
    index: int,
    tests: tuple[str, ...],
    files: dict[str, None],
    times: Iterable[float],
    fcosts: Mapping[str, float],
    startup: float,
) -> Shard:
    """The shard of tests (sorted) in files, predicted from their units' times."""
    # Added up in the units' order, as the plans before (not an fsum); map and reduce
    # run in C, where a loop would make a Python step per test.
    return Shard(
        index=index,
        tests=tests,
        files=tuple(sorted(files)),
        predicted=(startup if tests else 0.0)
        + functools.reduce(operator.add, times, 0.0)
        + math.fsum(map(fcosts.get, files, itertools.repeat(0.0))),
    )


def split(
    units: Sequence[Unit],
    n: int,
    *,
    file_costs: Mapping[str, float] | None = None,
    startup: float = 0.0,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    check: Check = no_check,
) -> Plan:
    """Assign units to n shards so the slowest shard finishes as early as possible.

    The result depends only on the set of units (not their order), n, the costs and
    max_iterations. Predicted shard times count each file's cost once per shard.
    """
    if n < 1:
        raise ValueError("the number of shards must be at least 1")
    fcosts = file_costs or {}
    # _int_weight of each, in C loops
    unit_weights = list(map(round, map(operator.mul, map(_weight, units), _SCALES)))
    ids = list(map(_first, map(_tests, units)))
    method, assign = _assign(ids, unit_weights, n, max_iterations, check)
    check()
    members = _grouped_by_shard(units, assign, n)  # each shard's units in input order
    shards = tuple(_shard(s, members[s], fcosts, startup) for s in range(n))
    check()
    lb = lower_bound(units, n, fcosts, startup) if units else 0.0
    return _plan(shards, lb, method)


def _assign(
    ids: Sequence[str], unit_weights: list[int], n: int, max_iterations: int, check: Check
) -> tuple[str, list[int]]:
    """The shard of each unit (by position), given each unit's id and integer weight,
    and the method that found the assignment: ``split``'s work on the units alone."""
    # Everything below works on units ranked by the total order, never on input positions.
    if unit_weights and min(unit_weights) < 0:
        unit_weights = [max(0, w) for w in unit_weights]
    order = _order(ids, unit_weights)
    weights = list(map(unit_weights.__getitem__, order))
    ranks = range(len(order))
    floor = math.ceil(sum(weights) / n)
    lpt, lpt_loads = _lpt_and_loads(weights, ranks, n, check)
    candidates: list[tuple[str, list[int]]] = [("lpt", lpt)]
    if (
        0 < len(ids) < _DIFFERENCING_UNITS_PER_SHARD * n
        and n > 1
        and len(ids) * n <= _DIFFERENCING_MAX_CELLS
    ):
        candidates.append(("differencing", _differencing(weights, ranks, n, check)))
    if 0 < len(ids) <= _EXACT_MAX_UNITS and n > 1:
        beat = min(_makespan(weights, a, n) for _, a in candidates)
        exact = _exact(weights, n, beat, _EXACT_NODE_LIMIT, check)
        if exact is not None:
            candidates.append(("exact", exact))
    best: tuple[int, str, list[int]] | None = None
    for name, assign in candidates:
        loads = lpt_loads if assign is lpt else None
        if _improve(weights, assign, n, floor, max_iterations, check, loads):
            name += "+improved"
            loads = None  # changed
        makespan = _makespan(weights, assign, n) if loads is None else max(loads)
        if best is None or makespan < best[0]:
            best = (makespan, name, assign)
    assert best is not None
    _, method, by_rank = best
    assign = [0] * len(ids)
    check()
    collections.deque(map(assign.__setitem__, order, by_rank), maxlen=0)  # by rank: in C
    return method, assign


def _plan(shards: tuple[Shard, ...], lb: float, method: str) -> Plan:
    predicted_makespan = max(s.predicted for s in shards)
    return Plan(
        shards=shards,
        makespan=predicted_makespan,
        lower_bound=lb,
        ratio=predicted_makespan / lb if lb > 0 else 1.0,
        plan_hash=plan_hash([s.tests for s in shards]),
        method=method,
    )


def _split_single_tests(
    tests: list[str],
    files: list[str],
    seconds: list[float],
    n: int,
    fcosts: Mapping[str, float],
    startup: float,
    max_iterations: int,
    check: Check,
) -> Plan:
    """``split`` of the units of a split by test without groups (one per test, sorted
    and distinct, with its file and predicted seconds), made without the units: their
    fields as parallel lists, each shard's picked out by position."""
    sharing = collections.Counter(files)  # how many tests each file's cost is shared by
    share_of = {f: fcosts[f] / count if f in fcosts else 0.0 for f, count in sharing.items()}
    weights = map(operator.add, seconds, map(share_of.__getitem__, files))  # each unit's
    unit_weights = list(map(round, map(operator.mul, weights, _SCALES)))
    method, assign = _assign(tests, unit_weights, n, max_iterations, check)
    check()
    members = _grouped_by_shard(range(len(tests)), assign, n)  # positions, in order
    shards = [
        _shard_of(  # _shard of the units at these positions
            index,
            tuple(map(tests.__getitem__, positions)),  # sorted: as the tests
            dict.fromkeys(map(files.__getitem__, positions)),
            map(seconds.__getitem__, positions),
            fcosts,
            startup,
        )
        for index, positions in enumerate(members)
    ]
    check()
    lb = _single_test_bound(seconds, files, n, fcosts, startup, check)
    return _plan(tuple(shards), lb, method)


def split_tests(
    times: Mapping[str, float],
    n: int,
    granularity: Granularity = "auto",
    *,
    file_costs: Mapping[str, float] | None = None,
    groups: Mapping[str, str] | None = None,
    startup: float = 0.0,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    check: Check = no_check,
) -> Plan:
    """``build_units`` then ``split``: test ids with predicted seconds to a plan.

    For ``auto``, when whole files leave the plan short of the lower bound, finer
    units (files cut to about a quarter of a shard) are tried too, and the plan
    with the shorter predicted makespan wins (the coarser on a tie). If that plan is
    still short of the bound, single tests (classes cut apart) are tried last, and
    win only when at least 2% shorter.
    """

    def plan_of(units: Sequence[Unit]) -> Plan:
        check()
        return split(
            units,
            n,
            file_costs=file_costs,
            startup=startup,
            max_iterations=max_iterations,
            check=check,
        )

    check()
    tests, files = _tests_and_files(times, check)
    fcosts = file_costs or {}
    # Each test's time in the tests' order: the times' own when they come sorted
    seconds = list(times.values()) if tests == list(times) else list(map(times.__getitem__, tests))
    file_of_test_made: dict[str, str] | None = None

    def units_of(granularity: Granularity, granules_per_shard: int = 1) -> list[Unit]:
        nonlocal file_of_test_made
        if file_of_test_made is None:
            file_of_test_made = dict(zip(tests, files, strict=True))
        return _build_units(
            times, file_of_test_made, n, granularity, fcosts, groups, granules_per_shard, check
        )

    # Without groups, single tests' units are split as parallel lists of their fields
    def by_single_tests() -> Plan:
        """plan_of(units_of("test")) without groups."""
        if n < 1:
            raise ValueError("the number of shards must be at least 1")
        check()
        return _split_single_tests(tests, files, seconds, n, fcosts, startup, max_iterations, check)

    if granularity == "test" and not groups:
        return by_single_tests()
    plan = plan_of(units_of(granularity))
    if granularity != "auto":
        return plan
    # Judge auto's plans against the bound of the finest split (single tests), not
    # against their own units: a plan of big units can sit on its own bound.
    test_units: list[Unit] | None = None
    if groups:
        test_units = units_of("test")
        bound = lower_bound(test_units, n, fcosts, startup) if test_units else 0.0
    else:
        bound = _single_test_bound(seconds, files, n, fcosts, startup, check)
    check()

    def good_enough(candidate: Plan) -> bool:
        return candidate.makespan <= bound * (1 + _AUTO_GOOD_ENOUGH)

    if not good_enough(plan):
        finer = plan_of(units_of(granularity, granules_per_shard=4))
        if finer.makespan < plan.makespan:
            plan = finer
        if not good_enough(plan):
            by_test = by_single_tests() if test_units is None else plan_of(test_units)
            if by_test.makespan < plan.makespan * (1 - _CUT_CLASSES_GAIN):
                plan = by_test
    ratio = plan.makespan / bound if bound > 0 else 1.0
    return replace(plan, lower_bound=bound, ratio=ratio)


@dataclass(frozen=True, slots=True)
class ShardSearch:
    """What `fewest_shards` found: the fewest shards meeting the target (None if none
    up to the limit does), whether one unit alone is longer than it, the last count
    tried, and the plans made on the way."""

    chosen: int | None
    too_long: bool
    last: int
    plans: Mapping[int, Plan]


def fewest_shards(
    times: Mapping[str, float],
    per_shard: float,
    granularity: Granularity = "auto",
    *,
    file_costs: Mapping[str, float] | None = None,
    startup: float = 0.0,
    max_shards: int = 256,
    max_iterations: int = 200,
) -> ShardSearch:
    """The fewest shards whose predicted makespan is within per_shard seconds: from the
    total over per_shard up, stopping early when a unit that cannot be split is longer."""
    total = math.fsum(times.values()) + math.fsum((file_costs or {}).values())
    n = min(max_shards, max(1, math.ceil(total / per_shard)))
    plans: dict[int, Plan] = {}
    while n <= max_shards:
        plan = plans[n] = split_tests(
            times,
            n,
            granularity,
            file_costs=file_costs,
            startup=startup,
            max_iterations=max_iterations,
        )
        if plan.makespan <= per_shard:
            return ShardSearch(n, False, n, plans)
        if plan.lower_bound - startup > total / n + 1e-9 and plan.lower_bound > per_shard:
            return ShardSearch(None, True, n, plans)  # the longest unit alone exceeds it
        n += 1
    return ShardSearch(None, False, max_shards, plans)
