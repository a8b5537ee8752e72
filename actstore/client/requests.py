"""Python selections (runs, layers, samples, label filters) as the request messages the server takes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from actstore.protocol import DTYPE_ENUMS
from actstore.v1 import actstore_pb2 as pb

Layers = int | Sequence[int] | range | slice | None
Labels = str | int | float | bool | Sequence[str | int | float | bool] | None  # compared as text by the server
Positions = int | Sequence[int] | None


def run_ref(model: str, method: str) -> pb.RunRef:
    return pb.RunRef(model=model, method=method)


def run_of(model: str, name: str) -> pb.RunRef:
    """A method of ``model``, or a ``"model/method"`` naming another model's run."""
    other, _, method = name.rpartition("/")
    return run_ref(other or model, method)


def range_of(s: slice | range) -> pb.Range:
    if s.step not in (None, 1):
        raise ValueError("only contiguous ranges (step 1) are supported")
    if s.start is None or s.stop is None:
        raise ValueError("a range needs a start and a stop")
    return pb.Range(start=s.start, stop=s.stop)


def layer_fields(layers: Layers) -> dict:
    """The ``layers`` or ``layer_range`` field of a ReadStatesRequest; none for every layer."""
    if layers is None:
        return {}
    if isinstance(layers, int):
        return {"layers": [layers]}
    if isinstance(layers, (slice, range)):
        return {"layer_range": range_of(layers)}
    return {"layers": list(layers)}


def states_request(
    model: str,
    method: str,
    layers: Layers,
    site: str | None,
    samples: pb.SampleSelection,
    dtype: str | None = None,
    allow_lossy: bool = False,
) -> pb.ReadStatesRequest:
    """A ReadStatesRequest from a client that decodes stored Blosc blocks (float32 and float16) itself.
    ``dtype``: "float32" or "float16"; None: as stored."""
    return pb.ReadStatesRequest(
        run=run_ref(model, method),
        samples=samples,
        dtype=pb.DTYPE_UNSPECIFIED if dtype is None else DTYPE_ENUMS[dtype],
        allow_lossy=allow_lossy,
        accept_blosc=True,
        accept_blosc_float16=True,
        site=site or "",
        **layer_fields(layers),
    )


def sample_selection(
    samples: Sequence[int] | slice | None,
    filters: dict[str, Labels],
    positions: Positions = None,
    tokens: slice | range | None = None,
    rows: Sequence[int] | None = None,
) -> pb.SampleSelection:
    """Sample ids (a sequence) or positions (a slice), narrowed by label filters (None: no filter); for a
    capture run, token ``positions`` in each text (negative from its end), a range of rows (``tokens``) or
    rows by index (``rows``)."""
    selection = pb.SampleSelection(
        filters=[
            pb.LabelFilter(name=name, values=[str(v) for v in _values(values)])
            for name, values in filters.items()
            if values is not None
        ]
    )
    if isinstance(samples, slice):
        selection.positions.CopyFrom(range_of(samples))
    elif samples is not None:
        selection.ids.extend(int(i) for i in samples)
    if positions is not None:
        selection.token_positions.extend(int(p) for p in ([positions] if np.ndim(positions) == 0 else positions))
    if tokens is not None:
        selection.token_range.CopyFrom(range_of(tokens))
    if rows is not None:
        selection.rows.extend(int(r) for r in rows)
    return selection


def _values(values: Labels) -> list:
    """A filter's values: one value, or several."""
    return [values] if isinstance(values, (str, bool, int, float, np.generic)) else list(values)
