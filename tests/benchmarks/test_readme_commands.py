"""Every benchmark command benchmarks/README.md shows still parses: its module exists, each
option it names is one the benchmark takes, and a concrete command's values are accepted
(each is parsed with --help appended, which stops before any work)."""

from __future__ import annotations

import importlib
import pathlib
import re
import shlex

import pytest

README = pathlib.Path(__file__).parents[2] / "benchmarks" / "README.md"
COMMAND = re.compile(r"python -m benchmarks\.(\w+)([^`\n#]*)")
OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def readme_commands() -> list[tuple[str, str]]:
    """(module, arguments) of each benchmark command in the README, once each."""
    found = {(m.group(1), m.group(2).strip()) for m in COMMAND.finditer(README.read_text())}
    return sorted(found)


def test_readme_shows_commands() -> None:
    assert len({module for module, _ in readme_commands()}) >= 9


@pytest.mark.parametrize(("module", "arguments"), readme_commands())
def test_readme_command_parses(
    module: str, arguments: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = importlib.import_module(f"benchmarks.{module}")
    # A synopsis ("[--json PATH]") names options only; a concrete command is parsed as is.
    concrete = "[" not in arguments
    argv = shlex.split(arguments) if concrete else []
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--help"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    help_text = capsys.readouterr().out
    for option in OPTION.findall(arguments):
        assert option in help_text, f"benchmarks.{module} takes no {option}"
