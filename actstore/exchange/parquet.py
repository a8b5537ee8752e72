"""A selection as one Parquet file, written a row group per block: the columns of actstore.exchange.arrow, and
the export record (actstore.exchange.record) as the schema's metadata under the key ``actstore``::

    table = pq.read_table(path, columns=["sample", "resid_post.6"])
    json.loads(table.schema.metadata[b"actstore"])["recipe"]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from actstore.exchange.arrow import arrow_schema, record_batch
from actstore.exchange.record import METADATA_KEY, dumps, export_record
from actstore.exchange.selection import Selection


def write_parquet(selection: Selection, path: Path, advance: Callable[[int], object] = lambda n: None) -> None:
    """Write ``selection`` to the Parquet file ``path``, telling ``advance`` how many rows each block wrote."""
    schema = arrow_schema(selection)
    schema = schema.with_metadata({METADATA_KEY: dumps(export_record(selection))})
    with pq.ParquetWriter(path, schema) as writer:
        for states, coordinates in selection.blocks():
            writer.write_batch(record_batch(selection, schema, states, coordinates))
            advance(states.shape[1])
