"""Argument types and options shared by the subcommands' parsers, below all of them (each subcommand's
CLI module imports from here; nothing imports a CLI module but ``actstore.cli``)."""

from __future__ import annotations

import argparse
import os

from actstore.store import DEFAULT_STORE


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    """``--store``, a folder or ``s3://bucket/prefix``, kept as text: ``type=Path`` would turn ``s3://b/x``
    into the folder ``s3:/b/x``. The command's ``Store(...)`` refuses an unknown scheme (UnsupportedLocation,
    one line) before anything is written."""
    parser.add_argument(
        "--store",
        default=os.fspath(DEFAULT_STORE),
        metavar="STORE",
        help="store folder, or s3://bucket/prefix on any S3-compatible service (credentials and "
        "endpoint from the usual AWS_* environment, e.g. AWS_ENDPOINT_URL) "
        "(default: %(default)s)",
    )


def csv_list(text: str) -> list[str]:
    """``a, b,,c`` -> ``["a", "b", "c"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def span(text: str) -> slice:
    """``START:STOP`` -> ``slice(START, STOP)``."""
    start, _, stop = text.partition(":")
    try:
        return slice(int(start), int(stop))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP, got {text!r}") from None


def ints(text: str) -> list[int]:
    """``3,7`` -> ``[3, 7]``."""
    try:
        return [int(v) for v in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def layer_selection(text: str) -> slice | list[int]:
    """``3,7`` or ``START:STOP``."""
    return span(text) if ":" in text else ints(text)


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
