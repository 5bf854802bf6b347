"""Reading JUnit XML reports: the many dialects found in the wild, safely.

Reports are parsed with expat directly, refusing DTD entity declarations and external
entities (so no XML bomb can expand), and read as the elements stream by: no tree and
no text content is kept (so a huge system-out costs nothing, and a 100,000-case report
is read in well under a second).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

from slipstream.splitter.ids import JUnitCase, colon_in_name, normalize_path

_CHUNK = 1 << 20
_FAILED_TAGS = frozenset({"failure", "error"})
_INF = float("inf")
_UNPARSED = -1.0  # never a parsed time
# Suite properties the slipstream plugin writes: per-file costs and shard start-up.
FILE_COST_PROPERTY = "slipstream.file_cost:"
STARTUP_PROPERTY = "slipstream.startup"
GROUP_PROPERTY = "xdist_group"  # a testcase property: tests that must share a shard


class NotJUnit(Exception):
    """A file that is not XML, or not a JUnit report; the message names the problem."""


@dataclass(frozen=True, slots=True)
class Report:
    """The cases read from one file, plus per-file costs the slipstream plugin stores."""

    path: str
    cases: tuple[JUnitCase, ...]
    file_costs: dict[str, float]
    startup: float | None = None


def parse_time(text: str | None) -> float | None:
    """Seconds from a JUnit time attribute: ``1.5``, ``1,078``, ``2,120.532``, ``0,5``."""
    if text is None:
        return None
    if "," not in text:
        try:  # the common case: what float() reads, the cleaning below reads the same
            seconds = float(text)
        except ValueError:
            pass
        else:
            ok = seconds == seconds and seconds not in (_INF, -_INF) and seconds >= 0
            return seconds if ok else None
    value = text.strip().replace("\u00a0", "").replace(" ", "")
    if "," in value:
        if "." in value or re.fullmatch(r"[1-9]\d{0,2}(,\d{3})+", value):
            value = value.replace(",", "")  # thousands separators
        else:
            value = value.replace(",", ".")  # a decimal comma
    try:
        seconds = float(value)
    except ValueError:
        return None
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return None
    return seconds


def outcome_of(tags: set[str]) -> str:
    """A case's outcome from its child elements' tags."""
    if not tags.isdisjoint(_FAILED_TAGS):
        return "failed"
    if "skipped" in tags:
        return "skipped"
    return "passed"  # flakyFailure/flakyError: passed on a rerun


def _forbid(*_: object) -> int:
    raise NotJUnit("declares XML entities, which are refused")


@dataclass(slots=True)
class _Suite:
    file: str | None
    props: list[tuple[str, str]]
    cases: list[JUnitCase]
    nested: list[_Suite]


class Reader:
    """Expat handlers that read the cases as the elements stream by, keeping no tree.

    The cases come out in the order of the report's tree: a suite's own cases, then its
    nested suites' (depth first), then cases directly under ``<testsuites>``; a suite's
    slipstream properties count before its nested suites'.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.root: str | None = None
        self.top: list[_Suite] = []
        self.root_cases: list[JUnitCase] = []
        # One entry per open element: the suite, case or properties it is, else None.
        self.stack: list[object] = []
        self.case_attrs: dict[str, str] = {}
        self.case_tags: set[str] | None = None  # the case's child elements, if any
        self.case_group: str | None = None
        # One string per distinct classname and file, however many cases share it.
        self.classnames: dict[str, str] = {}
        self.files: dict[str, str] = {}
        self.times: dict[str | None, float | None] = {}

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        stack = self.stack
        if not stack:
            self.root = tag
            if tag == "testsuite":
                suite = _Suite(attrs.get("file") or None, [], [], [])
                self.top.append(suite)
                stack.append(suite)
            else:
                stack.append(_ROOT if tag == "testsuites" else None)
            return
        parent = stack[-1]
        if parent is _CASE:
            if self.case_tags is None:
                self.case_tags = {tag}
            else:
                self.case_tags.add(tag)
            stack.append(_CASE_PROPS if tag == "properties" else None)
        elif tag == "testcase" and (parent is _ROOT or type(parent) is _Suite):
            self.case_attrs = attrs
            self.case_tags = None
            self.case_group = None
            stack.append(_CASE)
        elif type(parent) is _Suite:
            if tag == "testsuite":
                suite = _Suite(attrs.get("file") or parent.file, [], [], [])
                parent.nested.append(suite)
                stack.append(suite)
            else:
                stack.append((parent, _SUITE_PROPS) if tag == "properties" else None)
        elif parent is _ROOT and tag == "testsuite":
            suite = _Suite(attrs.get("file") or None, [], [], [])
            self.top.append(suite)
            stack.append(suite)
        elif tag == "property" and parent is _CASE_PROPS:
            if attrs.get("name") == GROUP_PROPERTY:
                self.case_group = attrs.get("value") or None
            stack.append(None)
        elif tag == "property" and type(parent) is tuple:
            name = attrs.get("name") or ""
            if name.startswith("slipstream."):
                parent[0].props.append((name, attrs.get("value") or ""))
            stack.append(None)
        else:
            stack.append(None)

    def end(self, _tag: str) -> None:
        if self.stack.pop() is not _CASE:
            return
        attrs, tags = self.case_attrs, self.case_tags
        outcome = "passed" if tags is None else outcome_of(tags)
        parent = self.stack[-1]
        if parent is _ROOT:
            suite_file, cases = None, self.root_cases
        else:
            assert type(parent) is _Suite
            suite_file, cases = parent.file, parent.cases
        file = attrs.get("file") or suite_file or None
        if file:
            normalized = self.files.get(file)
            if normalized is None:
                normalized = self.files[file] = normalize_path(file)
            file = normalized
        classname = attrs.get("classname") or ""
        classname = self.classnames.setdefault(classname, classname)
        time = attrs.get("time")
        seconds = self.times.get(time, _UNPARSED)  # few distinct times: each parsed once
        if seconds is _UNPARSED:
            seconds = self.times[time] = parse_time(time)
        name = attrs.get("name") or ""
        cases.append(
            _new_tuple(
                JUnitCase, (classname, name, file, seconds, outcome, self.path, self.case_group)
            )
        )

    def finish(self) -> tuple[list[JUnitCase], dict[str, float], float | None]:
        """The cases kept, in the report's tree order, the per-file costs and the start-up
        of the suites' properties (a later suite's value of a name wins)."""
        cases: list[JUnitCase] = []
        props: dict[str, str] = {}
        for suite in self.top:
            _walk(suite, cases, props)
        file_costs: dict[str, float] = {}
        for name, value in props.items():
            seconds = parse_time(value)
            if name.startswith(FILE_COST_PROPERTY) and seconds is not None:
                file_costs[name[len(FILE_COST_PROPERTY) :]] = seconds
        startup = parse_time(props.get(STARTUP_PROPERTY))
        cases.extend(self.root_cases)  # cases directly under <testsuites> (seen from some tools)
        return cases, file_costs, startup


class KeyedReader(Reader):
    """A Reader that puts each case that ran straight in the slot of the test id it
    names, keeping no case (but those of an xdist group, for the plain matching).

    ``slots`` maps a (classname, name), as classname -> name -> slot, to one of
    ``count`` slots (the ids'). A case ran when it has a time and is not a skip of
    under ``min_skipped_seconds``. A slot's first case goes in ``first`` (its seconds
    and whether it failed) and ``first_files``, any later one in ``more``. The
    (classname, file) of every case that ran, and whether any has a ":" in its name
    before its parameters, tell whether an id that names no case by (classname, name)
    could name one otherwise (``ids.none_other_in_scopes``). Files are as written
    (a case's own, else its suite's), not normalized.
    """

    def __init__(
        self,
        path: str,
        slots: Mapping[str, Mapping[str, int]],
        count: int,
        min_skipped_seconds: float,
    ) -> None:
        super().__init__(path)
        self.slots = slots
        self.min_skipped_seconds = min_skipped_seconds
        self.first: list[tuple[float, bool] | None] = [None] * count
        self.first_files: list[str | None] = [None] * count
        self.more: list[tuple[int, float, bool, str | None]] = []
        # The (classname, file) scopes: each classname's first file, and any other
        self.scope_files: dict[str, str | None] = {}
        self.scopes: set[tuple[str, str | None]] = set()
        self.colon_in_names = False

    def all_scopes(self) -> set[tuple[str, str | None]]:
        """The distinct (classname, file) of the cases that ran, files as written."""
        return self.scopes.union(self.scope_files.items())

    def end(self, tag: str) -> None:
        stack = self.stack
        if stack.pop() is not _CASE:
            return
        if self.case_group is not None:  # kept as a case: groups are matched the plain way
            stack.append(_CASE)
            Reader.end(self, tag)
        attrs, tags = self.case_attrs, self.case_tags
        time = attrs.get("time")
        seconds = self.times.get(time, _UNPARSED)  # few distinct times: each parsed once
        if seconds is _UNPARSED:
            seconds = self.times[time] = parse_time(time)
        if seconds is None:
            return
        failed = False
        if tags is not None:
            outcome = outcome_of(tags)
            if outcome == "skipped" and seconds < self.min_skipped_seconds:
                return  # skipped up front: not timing data
            failed = outcome == "failed"
        file = attrs.get("file")
        if not file:
            parent = stack[-1]
            file = None if parent is _ROOT else parent.file  # type: ignore[attr-defined]
        classname = attrs.get("classname") or ""
        name = attrs.get("name") or ""
        names = self.slots.get(classname)
        # The scopes: most classnames have one file, compared without a tuple and a set
        if self.scope_files.get(classname, _NO_FILE) != file:
            if classname in self.scope_files:
                self.scopes.add((classname, file))
            else:
                self.scope_files[classname] = file
        if ":" in name and colon_in_name(name):
            self.colon_in_names = True
        if names is None:
            return
        slot = names.get(name)
        if slot is None:
            return
        if self.first[slot] is None:
            self.first[slot] = (seconds, failed)
            self.first_files[slot] = file
        else:
            self.more.append((slot, seconds, failed, file))


_new_tuple = tuple.__new__  # a JUnitCase without the Python frame of its __new__
_ROOT = object()
_NO_FILE = object()
_CASE = object()
_CASE_PROPS = object()
_SUITE_PROPS = object()


def _walk(suite: _Suite, cases: list[JUnitCase], props: dict[str, str]) -> None:
    props.update(suite.props)
    cases.extend(suite.cases)
    for nested in suite.nested:
        _walk(nested, cases, props)


def parse_report(chunks: Iterable[bytes], path: str) -> Report:
    """The cases in one report given as byte chunks; raises NotJUnit."""
    reader = Reader(path)
    parse(reader, chunks)
    cases, file_costs, startup = reader.finish()
    return Report(path, tuple(cases), file_costs, startup)


def parse(reader: Reader, chunks: Iterable[bytes]) -> None:
    """Feed a report to a reader's handlers with expat; raises NotJUnit."""
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.EntityDeclHandler = _forbid  # type: ignore[assignment]
    parser.UnparsedEntityDeclHandler = _forbid  # type: ignore[assignment]
    parser.ExternalEntityRefHandler = _forbid
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.buffer_text = True
    empty = True
    try:
        for chunk in chunks:
            empty = empty and not chunk.strip()
            parser.Parse(chunk, False)
        if empty:
            raise NotJUnit("is empty")
        parser.Parse(b"", True)
    except expat.ExpatError as exc:
        raise NotJUnit(
            f"is not well-formed XML ({expat.errors.messages[exc.code]}, line {exc.lineno})"
        ) from None
    if reader.root not in ("testsuites", "testsuite"):
        raise NotJUnit(f"is XML but not a JUnit report (root element <{reader.root}>)")


def read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


PATHS_HELP = "files, globs (** allowed) or directories (every *.xml below one)"


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Paths from names, globs (``**`` allowed) and directories (every ``*.xml`` below
    one, in subdirectories too), sorted, without duplicates.

    Raises FileNotFoundError naming a pattern that matches nothing.
    """
    found: set[str] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"no file matches {pattern}")
            found.update(matches)
        elif os.path.isdir(pattern):
            below = os.path.join(glob.escape(pattern), "**", "*.xml")
            matches = [m for m in glob.glob(below, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"{pattern} is a directory without .xml files")
            found.update(matches)
        else:
            if not os.path.isfile(pattern):
                raise FileNotFoundError(f"{pattern}: no such file")
            found.add(pattern)
    return [Path(p) for p in sorted(found)]


def check_report(path: Path) -> None:
    """NotJUnit, naming the file, unless it is a JUnit report; OSError if unreadable."""
    try:
        parse_report(read_chunks(path), str(path))
    except NotJUnit as exc:
        raise NotJUnit(f"{path} {exc}") from None


def read_reports(paths: Iterable[Path]) -> tuple[list[Report], list[str]]:
    """Every readable report, and one warning line per file that could not be used."""
    reports: list[Report] = []
    warnings: list[str] = []
    for path in paths:
        try:
            reports.append(parse_report(read_chunks(path), str(path)))
        except NotJUnit as exc:
            warnings.append(f"{path}: {exc}; ignored")
        except OSError as exc:
            warnings.append(f"{path}: cannot be read ({exc.strerror or exc}); ignored")
    return reports, warnings
