"""Write docs/reference/cli.md from the command line's own parser, so the reference cannot drift from the
code: ``.venv/bin/python docs/generate_cli.py`` after changing a command (a test fails while it is stale)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

TARGET = Path(__file__).resolve().parent / "reference" / "cli.md"
HEADER = """# Command line

Every command and its options, as `actstore COMMAND --help` prints them. `python -m actstore` is the same
program. Errors a user can fix print one line, `actstore: error: ...`, and exit 1; `-v` shows debug logs
and full tracebacks.
"""


def _subcommands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(full command, parser) for ``parser`` and every subcommand below it, depth first."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, f"{prefix} {name}")


def render() -> str:
    """The reference page's text, with help wrapped at 100 columns whatever the terminal."""
    os.environ["COLUMNS"] = "100"
    from actstore.cli import build_parser

    sections = [HEADER]
    for command, parser in _subcommands(build_parser(), "actstore"):
        sections.append(f"## `{command}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(sections)


if __name__ == "__main__":
    TARGET.write_text(render())
    sys.exit(0)
