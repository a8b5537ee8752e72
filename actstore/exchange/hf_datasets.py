"""A selection as a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``), which
``datasets.load_from_disk`` opens memory-mapped: the columns of actstore.exchange.arrow, and the export record
(actstore.exchange.record) as JSON text in the dataset's ``DatasetInfo.description``, which ``datasets`` keeps
in ``dataset_info.json`` and carries along when the dataset is saved again or pushed to a hub (a file beside
the data would be left behind)::

    dataset = datasets.load_from_disk(path).with_format("numpy")
    dataset["resid_post.6"]  # (rows, hidden)
    json.loads(dataset.info.description)["recipe"]

The rows are streamed, a record batch per block, into one Arrow file in ``scratch``, which ``save_to_disk``
then writes out as ``datasets`` lays a dataset out (shards of 500 MB at most): the data is written twice, in
exchange for a folder that is exactly what ``datasets`` itself writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa

from actstore.exchange.arrow import arrow_schema, record_batch
from actstore.exchange.record import dumps, export_record
from actstore.exchange.selection import Selection


def write_hf_dataset(
    selection: Selection, folder: Path, scratch: Path, advance: Callable[[int], object] = lambda n: None
) -> None:
    """Write ``selection`` as a ``datasets`` folder ``folder``, streaming through ``scratch`` (an empty folder,
    on the same disk, that the caller removes)."""
    schema = arrow_schema(selection)
    features = datasets.Features.from_arrow_schema(schema)
    stream = scratch / "rows.arrow"
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, features.arrow_schema) as writer:
        for states, coordinates in selection.blocks():
            batch = record_batch(selection, schema, states, coordinates)
            writer.write_batch(batch.cast(features.arrow_schema))
            advance(states.shape[1])
    info = datasets.DatasetInfo(description=dumps(export_record(selection)), features=features)
    datasets.Dataset.from_file(str(stream), info=info).save_to_disk(str(folder))
