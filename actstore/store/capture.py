"""The arrays of a capture run: any sites, at any token positions, of any text dataset.

A capture run (format 2) has one growing axis of rows, named ``token`` when a text gives several rows
(``--positions all`` or several indices) and ``sample`` when it gives one (``last``, ``mean``, one index).
Every array grows along it, so a commit is one cut of every array, as in a question run (format 1)::

    {site}      (layer, row, hidden)  one per site, named after it; sharded, Blosc (layout.CAPTURE_CODECS),
                                      CRC-32C per chunk
    sample      (row,)                the text's id (its row in the dataset); a text's rows are contiguous
    position    (row,)                the token's position in its text (0 = first token); -1 for a mean
    token_id    (row,)                the token's id; -1 for a mean
    {label}     (row,)                each label column, repeated on every row of its text
    top_ids, top_logits (row, top)    the model's largest next-token logits at the row, when asked for
    letter_logits (row, letter)       the answer letters' next-token logits (questions at their last token)
    layer       (layer,)              block index

Labels are repeated per token rather than kept along a second axis: one growing axis keeps commits atomic
with one metadata write, and a reader selects tokens by label without a join (runs of equal values
compress to almost nothing). A site whose width is not the model's has its own width dimension,
``{site}.hidden``, so that one xarray Dataset holds every site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from actstore.store.layout import LABEL_CHUNK, STORE_DTYPES, StateLayout, capture_compressors
from actstore.store.names import validate_name

CAPTURE_FORMAT = 2
ROW_COORDS = {"sample": "int64", "position": "int64", "token_id": "int64"}
TOP_ARRAYS = {"top_ids": "int64", "top_logits": "float32"}
LETTER_LOGITS = "letter_logits"
LABEL_DTYPES = ("int64", "float64", "bool", "str")
RESERVED = frozenset({"layer", "hidden", "token", *ROW_COORDS, *TOP_ARRAYS, LETTER_LOGITS})


class IncompatibleSites(ValueError):
    """Sites that cannot share one run (different numbers of layers), or names that collide."""


@dataclass(frozen=True)
class CaptureLayout:
    """What a capture run stores, fixed when it is laid out; recorded in its ``capture`` attribute."""

    rows: str  # "token" or "sample"
    n_layers: int
    hidden: int  # the model's width: sites of this width share the dimension "hidden"
    sites: dict[str, int]  # site name -> width
    store_dtype: str = "float32"  # a STORE_DTYPES key
    labels: dict[str, str] = field(default_factory=dict)  # label column -> one of LABEL_DTYPES
    top_k: int = 0
    letters: tuple[str, ...] = ()  # the answer letters whose logits each row keeps (letter_logits), in order

    def __post_init__(self) -> None:
        if self.rows not in ("token", "sample"):
            raise ValueError(f"rows must be 'token' or 'sample', not {self.rows!r}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype {self.store_dtype!r}: choose from {', '.join(STORE_DTYPES)}")
        if not self.sites:
            raise IncompatibleSites("a capture run needs at least one site")
        names = [*self.sites, *self.labels]
        for name in names:
            validate_name(name, "site or label name")
        clash = sorted({n for n in names if n in RESERVED or names.count(n) > 1})
        if clash:
            raise IncompatibleSites(
                f"{', '.join(map(repr, clash))}: a site or label column may not be named like another one or "
                f"like the run's own arrays ({', '.join(sorted(RESERVED))}); rename it (--sites NAME=PATTERN)"
            )
        bad = {name: dtype for name, dtype in self.labels.items() if dtype not in LABEL_DTYPES}
        if bad:
            raise ValueError(f"label dtypes {bad}: choose from {', '.join(LABEL_DTYPES)}")

    @property
    def row_arrays(self) -> tuple[str, ...]:
        """The arrays along the rows besides the states, in the order a commit writes them."""
        return (
            *ROW_COORDS,
            *self.labels,
            *(TOP_ARRAYS if self.top_k else ()),
            *((LETTER_LOGITS,) if self.letters else ()),
        )

    def width_dim(self, site: str) -> str:
        return "hidden" if self.sites[site] == self.hidden else f"{site}.hidden"

    def record(self) -> dict[str, Any]:
        """The run's ``capture`` attribute."""
        return {
            "rows": self.rows,
            "n_layers": self.n_layers,
            "hidden": self.hidden,
            "sites": dict(self.sites),
            "store_dtype": self.store_dtype,
            "labels": dict(self.labels),
            "top_k": self.top_k,
            "letters": list(self.letters),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CaptureLayout:
        return cls(**{**record, "letters": tuple(record.get("letters", ()))})

    def create(self, group: zarr.Group) -> None:
        """Lay out the empty arrays of the run in ``group``."""
        coords = " ".join(self.row_arrays[: len(ROW_COORDS) + len(self.labels)])
        dtype = STORE_DTYPES[self.store_dtype]
        itemsize = np.dtype(dtype).itemsize
        for site, width in self.sites.items():
            layout = StateLayout(width, itemsize)
            group.create_array(
                site,
                shape=(self.n_layers, 0, width),
                dtype=dtype,
                chunks=layout.chunks,
                shards=layout.shards,
                compressors=capture_compressors(self.store_dtype),
                fill_value=float("nan"),
                dimension_names=("layer", self.rows, self.width_dim(site)),
                attributes={"coordinates": coords, "site": site, "store_dtype": self.store_dtype},
            )
        for name, dtype in {**ROW_COORDS, **self.labels}.items():
            dtype = str if dtype == "str" else dtype
            group.create_array(name, shape=(0,), dtype=dtype, chunks=(LABEL_CHUNK,), dimension_names=(self.rows,))
        if self.top_k:
            for name, dtype in TOP_ARRAYS.items():
                group.create_array(
                    name,
                    shape=(0, self.top_k),
                    dtype=dtype,
                    chunks=(LABEL_CHUNK // self.top_k or 1, self.top_k),
                    dimension_names=(self.rows, "top"),
                )
        if self.letters:
            group.create_array(
                LETTER_LOGITS,
                shape=(0, len(self.letters)),
                dtype="float32",
                chunks=(LABEL_CHUNK // len(self.letters), len(self.letters)),
                dimension_names=(self.rows, "letter"),
                attributes={"letters": " ".join(self.letters)},
            )
        layer = group.create_array("layer", shape=(self.n_layers,), dtype="int64", dimension_names=("layer",))
        layer[:] = np.arange(self.n_layers)
