"""Reading JUnit XML reports: the many dialects found in the wild, safely.

Reports are parsed with expat directly, refusing DTD entity declarations and external
entities (so no XML bomb can expand) and keeping no text content (so a huge
system-out costs nothing); junitparser then reads the element tree.
"""

from __future__ import annotations

import glob
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

import junitparser

from slipstream.splitter.ids import JUnitCase, normalize_path

_CHUNK = 1 << 20
_FAILED_TAGS = frozenset({"failure", "error"})
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


def _forbid(*_: object) -> int:
    raise NotJUnit("declares XML entities, which are refused")


def _parse_tree(chunks: Iterable[bytes]) -> ET.Element:
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.EntityDeclHandler = _forbid  # type: ignore[assignment]
    parser.UnparsedEntityDeclHandler = _forbid  # type: ignore[assignment]
    parser.ExternalEntityRefHandler = _forbid
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
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
    return builder.close()


def parse_report(chunks: Iterable[bytes], path: str) -> Report:
    """The cases in one report given as byte chunks; raises NotJUnit."""
    root = _parse_tree(chunks)
    if root.tag not in ("testsuites", "testsuite"):
        raise NotJUnit(f"is XML but not a JUnit report (root element <{root.tag}>)")
    xml = junitparser.JUnitXml.fromroot(root)  # type: ignore[arg-type]
    cases: list[JUnitCase] = []
    props: dict[str, str] = {}
    for suite in xml:
        _read_suite(suite, None, path, cases, props)
    file_costs: dict[str, float] = {}
    for name, value in props.items():
        seconds = parse_time(value)
        if name.startswith(FILE_COST_PROPERTY) and seconds is not None:
            file_costs[name[len(FILE_COST_PROPERTY) :]] = seconds
    startup = parse_time(props.get(STARTUP_PROPERTY))
    # Cases directly under <testsuites> (seen from some tools).
    for elem in xml._elem.iterfind("testcase"):
        cases.append(_case(junitparser.TestCase.fromelem(elem), None, path))  # type: ignore[no-untyped-call]
    return Report(path, tuple(cases), file_costs, startup)


def _read_suite(
    suite: junitparser.TestSuite,
    inherited_file: str | None,
    path: str,
    cases: list[JUnitCase],
    props: dict[str, str],
) -> None:
    suite_file = suite._elem.get("file") or inherited_file
    for prop in suite._elem.iterfind("properties/property"):
        name = prop.get("name") or ""
        if name.startswith("slipstream."):
            props[name] = prop.get("value") or ""
    for case in suite.iterchildren(junitparser.TestCase):  # type: ignore[no-untyped-call]
        cases.append(_case(case, suite_file, path))
    for nested in suite.testsuites():  # type: ignore[no-untyped-call]
        _read_suite(nested, suite_file, path, cases, props)


def _case(case: junitparser.TestCase, suite_file: str | None, path: str) -> JUnitCase:
    elem = case._elem
    tags = {child.tag for child in elem}
    if tags & _FAILED_TAGS:
        outcome = "failed"
    elif "skipped" in tags:
        outcome = "skipped"
    else:
        outcome = "passed"  # flakyFailure/flakyError: passed on a rerun
    file = elem.get("file") or suite_file
    group = None
    for prop in elem.iterfind("properties/property"):
        if prop.get("name") == GROUP_PROPERTY:
            group = prop.get("value") or None
    return JUnitCase(
        classname=elem.get("classname") or "",
        name=elem.get("name") or "",
        file=normalize_path(file) if file else None,
        time=parse_time(elem.get("time")),
        outcome=outcome,
        source=path,
        group=group,
    )


def _read_chunks(path: Path) -> Iterator[bytes]:
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
        parse_report(_read_chunks(path), str(path))
    except NotJUnit as exc:
        raise NotJUnit(f"{path} {exc}") from None


def read_reports(paths: Iterable[Path]) -> tuple[list[Report], list[str]]:
    """Every readable report, and one warning line per file that could not be used."""
    reports: list[Report] = []
    warnings: list[str] = []
    for path in paths:
        try:
            reports.append(parse_report(_read_chunks(path), str(path)))
        except NotJUnit as exc:
            warnings.append(f"{path}: {exc}; ignored")
        except OSError as exc:
            warnings.append(f"{path}: cannot be read ({exc.strerror or exc}); ignored")
    return reports, warnings
