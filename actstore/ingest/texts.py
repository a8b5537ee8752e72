"""Any text dataset, for capturing the hidden states of prompts that are not multiple-choice questions.

:mod:`actstore.ingest.datasets` reads question sets, whose prompts the study builds from choices and
answers. Work on sparse autoencoders and probes (SAELens users, for one) captures activations over any
text dataset instead: a column of prompts, or a template filled from each row, plus a few columns to keep
as labels. This module reads such a dataset from a JSONL, CSV or Parquet file, or from a folder written by
Hugging Face ``datasets``' ``Dataset.save_to_disk``, and checks it as it is read, so that a bad row is a
one-line :class:`DatasetError` before any prompt reaches the model. :func:`label_arrays` turns the labels
into the numpy arrays a run stores as coordinates along ``sample``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actstore.ingest.datasets import DatasetError, _sha256, jsonl_rows
from actstore.store.run import MAX_LABEL_CHARS

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
LISTED_COLUMNS = 20  # at most this many of a file's columns named in an error
PARQUET_BATCH_ROWS = 4096
LABEL_KINDS = (bool, int, float, str)  # bool first: a bool is an int
DTYPES = {bool: np.bool_, int: np.int64, float: np.float64}

Row = dict[str, object]


@dataclass(frozen=True)
class Text:
    id: int  # the row's index in the file, in file order from 0
    text: str  # the prompt: the text column's value, or the template filled from the row
    labels: dict[str, object]  # the label columns' values of this row (str, int, float, bool or None)


@dataclass
class TextDataset:
    name: str
    sha256: str
    texts: list[Text]
    label_columns: list[str]


@dataclass(frozen=True)
class _Table:
    """A file's columns, known before its rows are read; ``rows(needed)`` reads the rows, at least those
    columns of each."""

    columns: list[str]
    rows: Callable[[list[str]], Iterator[Row]]
    files: list[Path]


def load_texts(
    spec: str | Path,
    text_column: str | None = None,
    label_columns: Sequence[str] = (),
    template: str | None = None,
) -> TextDataset:
    """Read a JSONL, CSV or Parquet file or a ``save_to_disk`` folder into texts with labels.

    Exactly one of ``text_column`` (the column holding each prompt) and ``template`` (a format string over
    the columns, e.g. ``"Q: {question}\\nA: {answer}"``) is required. Texts keep the file's order and are
    not deduplicated: a text's id is its row's index. CSV values are strings; JSONL, Parquet and
    ``datasets`` values keep their types. Raises DatasetError, one line naming the file, row and column.
    """
    if (text_column is None) == (template is None):
        raise DatasetError(
            f"give exactly one of text_column and template, not {'neither' if template is None else 'both'}"
        )
    path = Path(spec)
    table = _open(path)
    if not table.columns:
        raise DatasetError(f"{path}: no rows (and no columns)")
    labels = list(label_columns)
    if text_column is not None:
        used = [text_column]
        _check_column(path, table.columns, text_column, "the text column")
    else:
        used = _template_columns(template)
        for column in used:
            _check_column(path, table.columns, column, "named in the template")
    for column in labels:
        _check_column(path, table.columns, column, "a label column")
    texts = [
        Text(index, _text(path, index, row, text_column, template, used), _labels(path, index, row, labels))
        for index, row in enumerate(table.rows(list(dict.fromkeys((*used, *labels)))))
    ]
    if not texts:
        raise DatasetError(f"{path}: no rows")
    for column in labels:
        _label_kind(column, texts)
    log.info("%s: %d texts, label columns %s", path, len(texts), labels)
    return TextDataset(name=path.name, sha256=_sha256(table.files), texts=texts, label_columns=labels)


def label_arrays(texts: list[Text], columns: list[str]) -> dict[str, np.ndarray]:
    """One array per label column, in the texts' order: bool, int64 or float64 (a missing float is NaN), or
    an object array of str (a missing str is ``""``). A column mixing types raises DatasetError."""
    arrays = {}
    for column in columns:
        kind = _label_kind(column, texts)
        values = [text.labels.get(column) for text in texts]
        if kind is str:
            arrays[column] = np.array(["" if value is None else value for value in values], dtype=object)
        else:
            arrays[column] = np.array([math.nan if value is None else value for value in values], dtype=DTYPES[kind])
    return arrays


def _open(path: Path) -> _Table:
    if path.is_dir():
        return _saved_dataset(path)
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}")
    readers = {".jsonl": _jsonl, ".json": _jsonl, ".csv": _csv, ".parquet": _parquet}
    if path.suffix.lower() not in readers:
        raise DatasetError(
            f"{path}: unknown dataset type {path.suffix!r}: give a {', '.join(SUFFIXES)} file "
            "or a folder written by datasets' save_to_disk"
        )
    return readers[path.suffix.lower()](path)


def _jsonl(path: Path) -> _Table:
    """JSON Lines: one object per line, blank lines skipped; the columns are the first row's keys."""

    def rows(needed: list[str]) -> Iterator[Row]:
        return (row for _, row in jsonl_rows(path))

    with contextlib.closing(rows([])) as head:
        first = next(head, {})
    return _Table(list(first), rows, [path])


def _csv(path: Path) -> _Table:
    """CSV with a header row; every value is a string (utf-8, a leading byte-order mark ignored)."""

    def rows(needed: list[str]) -> Iterator[Row]:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            yield from csv.DictReader(handle)

    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), [])
    return _Table(header, rows, [path])


def _parquet(path: Path) -> _Table:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DatasetError(f"reading {path} needs the pyarrow package: pip install pyarrow") from None
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None

    def rows(needed: list[str]) -> Iterator[Row]:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=needed):
            yield from batch.to_pylist()

    return _Table(parquet.schema_arrow.names, rows, [path])


def _saved_dataset(path: Path) -> _Table:
    """A folder written by ``Dataset.save_to_disk``; a ``DatasetDict``'s folder is refused for its splits'."""
    splits_file = path / "dataset_dict.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text(encoding="utf-8")).get("splits", [])
        raise DatasetError(
            f"{path} holds a DatasetDict with splits {', '.join(splits)}: give one split's folder, "
            f"e.g. {path / (splits[0] if splits else 'train')}"
        )
    if not (path / "state.json").is_file():
        raise DatasetError(
            f"{path}: a folder, but not one written by datasets' save_to_disk (no state.json); "
            f"files must end in {', '.join(SUFFIXES)}"
        )
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"reading {path} needs the datasets package: pip install datasets") from None
    dataset = datasets.load_from_disk(str(path))

    def rows(needed: list[str]) -> Iterator[Row]:
        yield from dataset.select_columns(needed)

    return _Table(list(dataset.column_names), rows, sorted(p for p in path.iterdir() if p.is_file()))


def _template_columns(template: str) -> list[str]:
    """The columns a format string names, in order; positional fields and bad syntax raise DatasetError."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise DatasetError(f"the template is not a valid format string ({exc}): {template!r}") from None
    columns = [re.split(r"[.\[]", field, maxsplit=1)[0] for field in fields]
    if any(column == "" or column.isdigit() for column in columns):
        raise DatasetError(
            f"the template {template!r} has a positional field ({{}} or {{0}}): name a column, e.g. {{text}}"
        )
    return list(dict.fromkeys(columns))


def _check_column(path: Path, columns: list[str], column: str, role: str) -> None:
    if column not in columns:
        listed = ", ".join(columns[:LISTED_COLUMNS]) or "none"
        if len(columns) > LISTED_COLUMNS:
            listed += f", ... ({len(columns)} in all)"
        raise DatasetError(f"{path}: no column {column!r} ({role}); its columns: {listed}")


def _text(path: Path, index: int, row: Row, text_column: str | None, template: str | None, used: list[str]) -> str:
    if template is None:
        text = row.get(text_column)
        if not isinstance(text, str):
            found = "missing" if text is None else f"of type {type(text).__name__}"
            raise DatasetError(f"{path}: row {index}: the text in column {text_column!r} is {found}, not a string")
        if not text.strip():
            raise DatasetError(f"{path}: row {index}: the text in column {text_column!r} is empty")
        return text
    missing = [column for column in used if row.get(column) is None]
    if missing:
        raise DatasetError(f"{path}: row {index}: no value in column {missing[0]!r}, which the template fills in")
    try:
        text = template.format_map({column: row[column] for column in used})
    except (ValueError, TypeError, LookupError, AttributeError) as exc:
        raise DatasetError(f"{path}: row {index}: the template cannot be filled from this row ({exc})") from None
    if not text.strip():
        raise DatasetError(f"{path}: row {index}: the template fills in an empty text")
    return text


def _labels(path: Path, index: int, row: Row, columns: list[str]) -> dict[str, object]:
    labels = {column: row.get(column) for column in columns}
    for column, value in labels.items():
        if value is not None and not isinstance(value, LABEL_KINDS):
            raise DatasetError(
                f"{path}: row {index}, column {column!r}: a label must be a str, int, float or bool, "
                f"not a {type(value).__name__}"
            )
        if isinstance(value, str) and len(value) > MAX_LABEL_CHARS:
            raise DatasetError(
                f"{path}: row {index}, column {column!r}: a label of {len(value):,} characters, above the "
                f"{MAX_LABEL_CHARS} a run stores"
            )
    return labels


def _label_kind(column: str, texts: list[Text]) -> type:
    """The one type of a label column's values (int with float counts as float; no value at all, as str).
    Raises DatasetError for a mix of types, a value of another type, or a missing bool or int."""
    first: dict[type | None, int] = {}  # each kind, with the id of the first text holding it
    for text in texts:
        value = text.labels.get(column)
        kind = None if value is None else next((k for k in LABEL_KINDS if isinstance(value, k)), None)
        if value is not None and kind is None:
            raise DatasetError(
                f"label column {column!r}: row {text.id} holds a {type(value).__name__}, not a str, int, float or bool"
            )
        first.setdefault(kind, text.id)
    kinds = {kind for kind in first if kind is not None}
    if kinds == {int, float}:
        kinds = {float}
    if len(kinds) > 1:
        found = " and ".join(f"{kind.__name__} (first in row {first[kind]})" for kind in sorted(kinds, key=first.get))
        raise DatasetError(f"label column {column!r} mixes {found}: one type per column")
    kind = kinds.pop() if kinds else str
    if kind in (bool, int) and None in first:
        raise DatasetError(
            f"label column {column!r} of {kind.__name__} values has no value in row {first[None]}: fill it in"
        )
    return kind


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
