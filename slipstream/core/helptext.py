"""How every `slipstream` command lays out its --help text."""

from __future__ import annotations

import argparse
import textwrap


class ParagraphFormatter(argparse.HelpFormatter):
    """Wraps descriptions and epilogs to the terminal, keeping their layout: a blank line
    separates paragraphs and indented lines (a table of exit codes) stay as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        prose: list[str] = []

        def flush() -> None:
            if prose:
                joined = " ".join(line.strip() for line in prose)
                out.extend(
                    textwrap.wrap(
                        joined,
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                        break_on_hyphens=False,
                        break_long_words=False,
                    )
                )
                prose.clear()

        for line in text.splitlines():
            if not line.strip():
                flush()
                out.append("")
            elif line[0].isspace():
                flush()
                out.append(indent + line.rstrip())
            else:
                prose.append(line)
        flush()
        return "\n".join(out)
