"""A capture run's row coordinates in ``Column`` messages (sample, position, token_id and its label columns):
encoded by the server from the run's arrays, decoded by the client into xarray coordinates along the run's
rows, typed as stored."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from actstore.v1 import actstore_pb2 as pb

VALUE_FIELDS = {"int64": "int64_values", "float64": "float64_values", "bool": "bool_values", "str": "str_values"}
NUMPY_DTYPES = {"int64": np.int64, "float64": np.float64, "bool": bool, "str": str}  # str: no object arrays


def encode_column(name: str, dtype: str, values: np.ndarray) -> pb.Column:
    """One coordinate's values (of the rows chosen) in the list its ``dtype`` names."""
    return pb.Column(name=name, dtype=dtype, **{VALUE_FIELDS[dtype]: values.tolist()})


def column_coords(columns: Iterable[pb.Column], row_dim: str) -> dict[str, Any]:
    """xarray coordinates of the rows: each column along ``row_dim``; ``sample`` indexes the rows where they
    are samples (one per text), as in a question run."""
    coords: dict[str, Any] = {}
    for column in columns:
        if column.dtype not in VALUE_FIELDS:
            raise ValueError(f"column {column.name!r} has an unknown dtype {column.dtype!r}")
        values = np.asarray(getattr(column, VALUE_FIELDS[column.dtype]), dtype=NUMPY_DTYPES[column.dtype])
        coords[column.name] = values if column.name == row_dim else (row_dim, values)
    return coords
