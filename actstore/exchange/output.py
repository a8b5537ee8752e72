"""Where an export lands: written beside its destination, then moved into place, so that a failed or
interrupted export leaves nothing (and whatever it was to replace intact), and nothing is replaced without
``--overwrite``, nor anything but what an export writes (a file; a ``datasets`` folder)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from actstore.exchange.selection import ExchangeError

DATASET_FILES = ("state.json", "dataset_info.json")  # what marks a folder ``datasets.save_to_disk`` wrote


def check_output(out: Path, folder: bool, overwrite: bool) -> None:
    """Refuse ``out`` where it exists (unless ``overwrite``) or cannot be written: a folder that is not a
    ``datasets`` folder is never replaced (``folder``: the export writes one), nor a folder by a file."""
    if not out.parent.is_dir():
        raise ExchangeError(f"{out.parent} is not a folder: create it first, or give --out another path")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise ExchangeError(f"{out} exists; pass --overwrite to replace it")
    if folder and not (out.is_dir() and all((out / name).is_file() for name in DATASET_FILES)):
        raise ExchangeError(f"{out} exists and is not a datasets folder: it is not replaced; give --out another path")
    if not folder and out.is_dir():
        raise ExchangeError(f"{out} is a folder: it is not replaced by a file; give --out another path")


@contextlib.contextmanager
def replacing(out: Path) -> Iterator[tuple[Path, Path]]:
    """(where to write, an empty scratch folder), both in a hidden folder beside ``out``; once the block ends
    without an error the result replaces ``out``. The hidden folder is removed in every case."""
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        scratch = work / "scratch"
        scratch.mkdir()
        yield work / out.name, scratch
        if os.path.lexists(out):  # a folder cannot be replaced in one rename: move it aside first
            os.replace(out, work / "replaced")
        os.replace(work / out.name, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
