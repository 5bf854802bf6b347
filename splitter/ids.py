"""Test ids: the names runners use, and how JUnit records map onto them.

A pytest node id looks like ``tests/test_x.py::TestC::test_y[param]``; other
runners split by file path (``spec/models/user_spec.rb``) or by class name
(``com.example.UserTest``). All functions here are pure.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence
from typing import NamedTuple


def _parts(test_id: str) -> list[str]:
    # Parameters may hold "::" themselves, so split only the part before "[".
    base, bracket, params = test_id.partition("[")
    parts = base.split("::")
    parts[-1] += bracket + params
    return parts


def file_of(test_id: str) -> str:
    """The file a test id belongs to (the id itself when it has no ``::``)."""
    # _parts(test_id)[0], without its lists: the first "::" unless a "[" comes first
    cut = test_id.find("::")
    if cut < 0 or test_id.find("[", 0, cut) >= 0:
        return test_id
    return test_id[:cut]


def class_of(test_id: str) -> str | None:
    """``file::Class[::Inner]`` for a test in a class, else None."""
    base = test_id.partition("[")[0]
    if base.count("::") < 2:  # non-overlapping, as split counts them
        return None
    if ":::" in base:  # split("::") and rfind("::") may cut at different places
        return "::".join(base.split("::")[:-1])
    return base[: base.rfind("::")]


def directories_of(path: str) -> list[str]:
    """The parent directories of a path, innermost first, ending with ``""``."""
    out = []
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        out.append(path)
    out.append("")
    return out


def normalize_path(path: str) -> str:
    """A relative POSIX path: backslashes to slashes, no leading ``./``."""
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def _module_dotted(path: str) -> str:
    stem = path[:-3] if path.endswith(".py") else path
    return stem.replace("/", ".")


def junit_key(test_id: str) -> tuple[str, str] | None:
    """The (classname, name) pytest writes in JUnit for a node id, or None if not a node id."""
    parts = _parts(test_id)
    if len(parts) < 2 or not parts[0].endswith(".py"):
        return None
    classname = ".".join([_module_dotted(parts[0]), *parts[1:-1]])
    return classname, parts[-1]


def _node_id_prefix(classname: str, file: str | None, name: str) -> str | None:
    """What ``node_id`` puts before ``::name``, or None when the id is the name alone.

    It does not depend on the name: ``name`` is only a stand-in to reuse ``node_id``.
    """
    whole = node_id(JUnitCase(classname, name, file, None, "passed", ""))
    if whole == name and not classname and not file:
        return None
    assert whole.endswith("::" + name)
    return whole[: -len(name) - 2]


class JUnitCase(NamedTuple):
    """One <testcase>: its names, its time in seconds (None if absent) and outcome.

    A tuple: a 100,000-case report makes one per case, and a frozen dataclass, which
    sets each field through ``object.__setattr__``, takes three times as long to make.
    """

    classname: str
    name: str
    file: str | None
    time: float | None
    outcome: str  # "passed", "failed" or "skipped"
    source: str  # the report it came from
    group: str | None = None  # tests that must share a shard (an xdist_group mark)


def node_id(case: JUnitCase) -> str:
    """The best-guess runner id for a case when no candidate ids are known.

    With a ``file`` attribute that agrees with the classname this is exact. Without one
    (pytest's default xunit2), a classname whose module is named like a pytest test file
    (``test_*``, ``*_test``) is split where class names (Capitalized) begin; when the
    file attribute names another module (a test inherited from a base class elsewhere),
    the classname wins, as it names the module that collected it. Other classnames give
    ``classname::name``.
    """
    classname = case.classname
    if case.file:
        path = normalize_path(case.file)
        dotted = _module_dotted(path)
        if classname == dotted or classname.startswith(dotted + "."):
            classes = classname[len(dotted) + 1 :]
            return "::".join([path, *([c for c in classes.split(".") if c]), case.name])
        if not classname:
            return f"{path}::{case.name}"
        if not path.endswith(".py"):
            return f"{path}::{classname}::{case.name}"
    if not classname:
        return case.name
    pieces = classname.split(".")
    first_class = len(pieces)
    while first_class > 1 and pieces[first_class - 1][:1].isupper():
        first_class -= 1
    module = pieces[first_class - 1]
    if module.startswith("test_") or module.endswith("_test"):  # pytest's python_files
        path = "/".join(pieces[:first_class]) + ".py"
        return "::".join([path, *pieces[first_class:], case.name])
    return f"{classname}::{case.name}"  # JUnit from another runner (Surefire, go, ...)


def case_file(case: JUnitCase) -> str:
    """The file a case belongs to: its file attribute, else derived from its node id."""
    if case.file:
        return normalize_path(case.file)
    return file_of(node_id(case))


def match_cases(
    cases: Iterable[JUnitCase], candidates: Iterable[str]
) -> dict[str, list[JUnitCase]]:
    """The cases that belong to each candidate id.

    A candidate matches, in this order: a pytest node id by the (classname, name)
    pytest writes for it; else the cases whose own id is the candidate; else all cases
    of a file (candidate is a file path); else all cases of a class name (candidate is
    a classname, as Surefire/Gradle splits use). Candidates with no match are left out.
    """
    cases = list(cases)
    by_classname: dict[str, dict[str, list[JUnitCase]]] = {}  # classname -> name -> cases
    for case in cases:
        names = by_classname.get(case.classname)
        if names is None:
            names = by_classname[case.classname] = {}
        got = names.get(case.name)
        if got is None:
            names[case.name] = [case]
        else:
            got.append(case)
    out: dict[str, list[JUnitCase]] = {}
    missed: list[str] = []  # in out as [] for now, which keeps the candidates' order
    candidates = list(candidates)
    for candidate, key in zip(candidates, candidate_keys(candidates), strict=True):
        found = None
        if key is not None:
            names = by_classname.get(key[0])
            if names is not None:
                found = names.get(key[1])
        if found:
            out[candidate] = found
        elif candidate not in out:
            out[candidate] = []
            missed.append(candidate)
    if missed:
        if _none_other(cases, missed):
            nothing: dict[str, list[JUnitCase]] = {}
            by_id = by_file = by_class = nothing
        else:
            by_id, by_file, by_class = _other_indexes(cases, missed)
        for candidate in missed:
            found = (
                by_id.get(candidate)
                or by_file.get(normalize_path(candidate))
                or by_class.get(candidate)
            )
            if found:
                out[candidate] = found
            else:
                del out[candidate]
    return out


def candidate_keys(candidates: Iterable[str]) -> list[tuple[str, str] | None]:
    """The (classname, name) by which ``match_cases`` first looks a candidate up: its
    ``junit_key``, or None for one without ``::`` (a file, a classname, a bare name).

    Made fast: the candidates of one scope (what comes before the last ``::``, a file
    and its classes) share one classname, made once for a run of them (they come one
    after another when the candidates are sorted).
    """
    keys: list[tuple[str, str] | None] = []
    last_scope: str | None = None
    classname: str | None = None
    for candidate in candidates:
        base = candidate.partition("[")[0]
        scope, separator, _ = base.rpartition("::")
        if not separator:
            keys.append(None)
        elif ":::" in base:  # split("::") may cut elsewhere than rpartition
            keys.append(junit_key(candidate))
        else:
            if scope != last_scope:
                classname, last_scope = _classname_of_scope(scope), scope
            keys.append(None if classname is None else (classname, candidate[len(scope) + 2 :]))
    return keys


def slots_by_key(candidates: Sequence[str]) -> dict[str, dict[str, int]] | None:
    """Each candidate's position under its ``candidate_keys`` key, as classname ->
    name -> position; None when a candidate has no key or shares one with another
    (then only ``match_cases`` matches them as it does)."""
    slots: dict[str, dict[str, int]] = {}
    for position, key in enumerate(candidate_keys(candidates)):
        if key is None:
            return None
        names = slots.get(key[0])
        if names is None:
            names = slots[key[0]] = {}
        elif key[1] in names:
            return None
        names[key[1]] = position
    return slots


def _classname_of_scope(scope: str) -> str | None:
    """The classname pytest writes for a scope (``file[::Class]``), None if not a .py file."""
    parts = scope.split("::")
    if not parts[0].endswith(".py"):
        return None
    return ".".join([_module_dotted(parts[0]), *parts[1:]])


def node_ids(cases: Iterable[JUnitCase]) -> list[str]:
    """``node_id`` of each case, each (classname, file)'s part made once."""
    prefixes: dict[tuple[str, str | None], str | None] = {}
    out: list[str] = []
    for case in cases:
        scope = (case.classname, case.file)
        if scope in prefixes:
            prefix = prefixes[scope]
        else:
            prefix = prefixes[scope] = _node_id_prefix(case.classname, case.file, case.name)
        out.append(case.name if prefix is None else f"{prefix}::{case.name}")
    return out


def _none_other(cases: list[JUnitCase], missed: list[str]) -> bool:
    """True when no candidate missed by (classname, name) can name a case otherwise (by
    its node id, file or classname), known from the (classname, file) scopes alone.

    So in the common case: every scope's node ids are ``prefix::name`` with a prefix
    that junit_key cuts back into the scope's classname, and no name has a ":" before
    its parameters, so junit_key(a case's node id) is the case's own (classname, name)
    and a candidate naming it by id was not missed; and no scope's file or classname
    is a missed candidate.
    """
    names = map(_first, map(str.partition, map(_name, cases), _BRACKETS))
    if any(map(operator.contains, names, _COLONS)):  # colon_in_name of each, in C
        return False
    scopes = set(zip(map(_classname, cases), map(_file, cases), strict=True))
    return none_other_in_scopes(scopes, missed)


def colon_in_name(name: str) -> bool:
    """Whether a case's name has a ":" before its parameters (then its node id may not
    cut back into its classname and name)."""
    return ":" in name and ":" in name.partition("[")[0]


def none_other_in_scopes(scopes: Iterable[tuple[str, str | None]], missed: list[str]) -> bool:
    """``_none_other`` of cases whose names have no ":" before their parameters, from
    their distinct (classname, file) scopes alone."""
    wanted = set(missed)
    wanted_files = {normalize_path(c) for c in missed}
    modules: dict[str, tuple[str, str] | None] = {}  # file -> (path, dotted), if plain
    for classname, file in scopes:
        if classname in wanted:
            return False
        if file and _plain_scope(classname, file, modules):
            scope_file = modules[file][0]  # type: ignore[index]
        else:  # the general rule
            prefix = _node_id_prefix(classname, file, "x")
            if prefix is None or junit_key(prefix + "::x") != (classname, "x"):
                return False
            scope_file = normalize_path(file) if file else file_of(prefix + "::x")
        if scope_file in wanted_files:
            return False
    return True


def _plain_scope(classname: str, file: str, modules: dict[str, tuple[str, str] | None]) -> bool:
    """Whether the scope's node ids are ``path::Class::...::name`` for a .py path and
    classes without ":", "[" or empty parts, which junit_key cuts back into the classname
    and the name: what most reports hold, known without node_id and junit_key (in
    modules, each file's normalized path and dotted module, None if not plain)."""
    if file in modules:
        module = modules[file]
    else:
        path = normalize_path(file)
        plain = path.endswith(".py") and ":" not in path and "[" not in path
        module = modules[file] = (path, _module_dotted(path)) if plain else None
    if module is None:
        return False
    dotted = module[1]
    if classname == dotted:
        return True
    if not classname.startswith(dotted + "."):
        return False
    classes = classname[len(dotted) + 1 :]
    return ":" not in classes and "[" not in classes and all(classes.split("."))


_first = operator.itemgetter(0)
_classname = operator.attrgetter("classname")
_name = operator.attrgetter("name")
_file = operator.attrgetter("file")
_BRACKETS = itertools.repeat("[")
_COLONS = itertools.repeat(":")


def _other_indexes(
    cases: list[JUnitCase], candidates: list[str]
) -> tuple[dict[str, list[JUnitCase]], dict[str, list[JUnitCase]], dict[str, list[JUnitCase]]]:
    """Cases by node id, by file and by classname, only under the keys the candidates
    may look up (a small index for the few ids their (classname, name) misses).

    The work is per (classname, file) scope: its node ids' prefix, its file and whether
    any candidate could name one of its cases, made once; the cases of a scope no
    candidate could name are passed over.
    """
    wanted = set(candidates)
    wanted_files = {normalize_path(c) for c in candidates}
    # What could come before "::name" in a wanted node id: every cut at a "::".
    wanted_prefixes = set()
    for c in candidates:
        cut = c.find("::")
        while cut >= 0:
            wanted_prefixes.add(c[:cut])
            cut = c.find("::", cut + 1)
    by_id: dict[str, list[JUnitCase]] = {}
    by_file: dict[str, list[JUnitCase]] = {}
    by_class: dict[str, list[JUnitCase]] = {}
    # (classname, file) -> None when no candidate can name its cases, else (what the node
    # id has before "::name", the scope's file or None when it depends on the name)
    scopes: dict[tuple[str, str | None], tuple[str | None, str | None] | None] = {}
    for case in cases:
        scope = (case.classname, case.file)
        if scope in scopes:
            known = scopes[scope]
        else:
            known = scopes[scope] = _scope_of(case, wanted, wanted_files, wanted_prefixes)
        if known is None:
            continue
        prefix, file = known
        test_id = case.name if prefix is None else f"{prefix}::{case.name}"
        if test_id in wanted:
            by_id.setdefault(test_id, []).append(case)
        file = file or file_of(test_id)
        if file in wanted_files:
            by_file.setdefault(file, []).append(case)
        if case.classname in wanted:
            by_class.setdefault(case.classname, []).append(case)
    return by_id, by_file, by_class


def _scope_of(
    case: JUnitCase, wanted: set[str], wanted_files: set[str], wanted_prefixes: set[str]
) -> tuple[str | None, str | None] | None:
    """For the cases of case's (classname, file): their node ids' prefix and their file
    (None when it depends on the name); None when no wanted id can name any of them."""
    prefix = _node_id_prefix(case.classname, case.file, case.name)
    if case.file:
        file: str | None = normalize_path(case.file)
    elif prefix is None:
        file = None  # the node id is the name alone
    else:
        # file_of(prefix::name) is cut at the first "::" before any "[": inside the
        # prefix or at the separator, unless a "[" in the prefix comes first
        with_separator = prefix + "::"
        file = file_of(with_separator)
        if file == with_separator:
            file = None
    could_be_named = (
        case.classname in wanted
        or prefix is None
        or prefix in wanted_prefixes
        or file is None
        or file in wanted_files
    )
    return (prefix, file) if could_be_named else None


def files_of(tests: Iterable[str]) -> list[str]:
    """``[file_of(test) for test in tests]``, made without a call per test (100,000
    calls add up)."""
    # file_of: the part before the first "::", unless a "[" comes before it
    return [t if "[" in (head := t.partition("::")[0]) else head for t in tests]


def file_map(tests: Iterable[str]) -> dict[str, str]:
    """``{test: file_of(test)}``, made as files_of makes the files."""
    listed = list(tests)
    return dict(zip(listed, files_of(listed), strict=True))
