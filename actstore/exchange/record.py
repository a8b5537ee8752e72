"""The record every export carries: what run, site, layers and rows it holds, and the run's recipe and
provenance, so that an exported file says what made its numbers and an import can rebuild the run.

It travels as JSON text: Parquet's schema metadata under the key ``actstore``, the ``description`` of the
Hugging Face dataset's ``DatasetInfo`` (``datasets.load_from_disk(path).info.description``), and netCDF
attributes (``recipe``, ``run_attributes`` and ``actstore``, as ``actstore query get`` writes them).
"""

from __future__ import annotations

import json
from typing import Any

from actstore.exchange.selection import ExchangeError, Selection

FORMAT = "actstore-export"
VERSION = 1
METADATA_KEY = "actstore"  # Parquet schema metadata key, netCDF attribute
# Attributes that describe the stored arrays rather than where the values came from: left out of an export.
_STORE_BOOKKEEPING = ("shard_record", "json_attributes")


def run_attributes(selection: Selection) -> dict[str, Any]:
    """The run's attributes as an export keeps them: recipe, provenance, history, progress, access, capture
    layout; not the shard record (checksums of the store's own files)."""
    return {k: v for k, v in selection.run.attrs.items() if k not in _STORE_BOOKKEEPING}


def export_record(selection: Selection) -> dict[str, Any]:
    """What an export holds and where it came from (see the module docstring)."""
    run = selection.run
    attributes = run_attributes(selection)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": run.model,
        "method": run.method,
        "kind": selection.kind,
        "site": selection.site,
        "layers": list(selection.layers),
        "rows": selection.row_dim,
        "n_rows": len(selection.rows),
        "selection": {k: v for k, v in selection.asked.items() if v is not None},
        "dtype": str(selection.dtype),
        "width": selection.width,
        "columns": {str(layer): selection.column(layer) for layer in selection.layers},
        "coordinates": list(selection.coordinates),
        "letters": selection.letters,
        "recipe": attributes.get("recipe", {}),
        "attributes": attributes,
    }


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, default=str)


def parse_record(text: str | bytes | None) -> dict[str, Any] | None:
    """The export record in ``text``, or None where it holds none (a cache made elsewhere)."""
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return None
    if record.get("version") != VERSION:
        raise ExchangeError(
            f"an actstore export of version {record.get('version')!r}; this actstore reads version {VERSION}"
        )
    return record
