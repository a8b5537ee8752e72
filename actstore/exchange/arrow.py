"""A selection as Arrow columns, shared by the Parquet and Hugging Face ``datasets`` exports and read back by
the import of an export.

One row per row of the run (a sample or a token), its coordinates first, then one column per layer,
``{site}.{layer}``, each a fixed-size list of the width's values (float32, or float16 where the run stores
float16). A column per layer rather than one (layer, hidden) column: Parquet and Arrow read columns apart, so
a probe or a sparse autoencoder trained on one layer reads that layer's bytes only
(``pq.read_table(path, columns=["resid_post.6"])``, ``dataset.select_columns(...)``), and a layer's column
turns into a (rows, hidden) matrix without a copy. A capture run's top logits and answer-letter logits are
fixed-size lists too; text labels are strings.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from actstore.exchange.selection import Selection


def _value_type(values: np.ndarray) -> pa.DataType:
    kind = values.dtype.kind
    if kind in "OUST":
        return pa.string()
    if kind == "b":
        return pa.bool_()
    return pa.from_numpy_dtype(values.dtype)


def _coordinate_type(values: np.ndarray) -> pa.DataType:
    if values.ndim == 2:
        return pa.list_(_value_type(values), values.shape[1])
    return _value_type(values)


def arrow_schema(selection: Selection) -> pa.Schema:
    """The columns of the selection's rows: coordinates, then the states of each layer."""
    fields = [pa.field(name, _coordinate_type(values)) for name, values in selection.coordinates.items()]
    states = pa.list_(pa.from_numpy_dtype(selection.dtype), selection.width)
    fields += [pa.field(selection.column(layer), states) for layer in selection.layers]
    return pa.schema(fields)


def record_batch(
    selection: Selection, schema: pa.Schema, states: np.ndarray, coordinates: dict[str, np.ndarray]
) -> pa.RecordBatch:
    """One block of rows (``Selection.blocks``) as a record batch of ``schema``."""
    arrays = [_column(coordinates[name], schema.field(name).type) for name in selection.coordinates]
    arrays += [
        _fixed(states[i], schema.field(selection.column(layer)).type) for i, layer in enumerate(selection.layers)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _column(values: np.ndarray, kind: pa.DataType) -> pa.Array:
    return _fixed(values, kind) if values.ndim == 2 else pa.array(values, type=kind)


def _fixed(values: np.ndarray, kind: pa.FixedSizeListType) -> pa.FixedSizeListArray:
    """(rows, k) values as a fixed-size list column of ``kind``."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=kind.value_type)
    return pa.FixedSizeListArray.from_arrays(flat, type=kind)


def to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column read back as numpy: a fixed-size list column as (rows, k), text as str, others as stored."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return np.asarray(column.to_pylist(), dtype=object)
    return column.to_numpy(zero_copy_only=False)
