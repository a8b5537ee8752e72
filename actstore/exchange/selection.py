"""What an export takes from a run: one site, some layers, some rows, read in blocks.

Every format writes the same selection: the states of one site at the layers asked for, along the run's rows
(a question run's samples; a capture run's tokens or texts) in the order the run stores them, with each row's
coordinates (a question run's sample, subject, answer, prediction, correct; a capture run's sample, position,
token_id, label columns, and its top logits and answer-letter logits where it keeps them). Rows are read in
blocks of about ``BLOCK_BYTES`` of states, so that a run larger than memory streams through.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from actstore.store import Run, SiteNotFound

BLOCK_BYTES = 64 * 1024 * 1024  # states read and written at once: a Parquet row group, an Arrow record batch
MULTI_COLUMNS = ("top_ids", "top_logits", "letter_logits")  # a capture run's coordinates of several values a row


class ExchangeError(ValueError):
    """Input an export or import refuses: an unknown site or layer, an output that exists, a folder that is
    not an Arrow cache. Raised before anything is written; its message is the one line a user sees."""


@dataclass(frozen=True)
class Selection:
    """One site's states at ``layers`` for the run's rows at ``rows`` (positions along its row axis,
    ascending), as every format exports them."""

    run: Run
    site: str
    layers: list[int]
    rows: np.ndarray
    asked: dict[str, Any] = field(default_factory=dict)  # the selection as asked (samples, rows), for the record

    @property
    def row_dim(self) -> str:
        return self.run.row_dim

    @property
    def width_dim(self) -> str:
        """The states' width dimension: ``hidden``, or ``{site}.hidden`` for a capture site of another width."""
        return "hidden" if self.run.capture is None else self.run.capture.width_dim(self.site)

    @property
    def width(self) -> int:
        return int(self.run.states(self.site).shape[2])

    @property
    def dtype(self) -> np.dtype:
        """The states' dtype as stored and exported: float32 (bfloat16 values included), or float16."""
        return np.dtype(self.run.states(self.site).dtype)

    @property
    def kind(self) -> str:
        return "questions" if self.run.capture is None else "capture"

    @property
    def states_bytes(self) -> int:
        return len(self.layers) * len(self.rows) * self.width * self.dtype.itemsize

    def column(self, layer: int) -> str:
        """The name of one layer's states column in the Arrow formats: ``{site}.{layer}``."""
        return f"{self.site}.{layer}"

    @cached_property
    def coordinates(self) -> dict[str, np.ndarray]:
        """Every row coordinate of the run, all rows, by name: its 1-D labels, then (a capture run) its top
        logits and answer-letter logits, (rows, k) each."""
        columns = dict(self.run.labels())
        capture = self.run.capture
        if capture is not None and (capture.top_k or capture.letters):
            ds = self.run.to_xarray()
            columns.update({name: ds[name].values for name in MULTI_COLUMNS if name in ds.coords})
        return columns

    @property
    def letters(self) -> list[str]:
        """The answer letters of ``letter_logits``' columns, in order (none when the run keeps no such logits)."""
        return [] if self.run.capture is None else list(self.run.capture.letters)

    def block_rows(self, block_bytes: int | None = None) -> int:
        """Rows per block: about ``block_bytes`` (default BLOCK_BYTES) of states, one row at least."""
        row_bytes = len(self.layers) * self.width * self.dtype.itemsize
        return max(1, (BLOCK_BYTES if block_bytes is None else block_bytes) // max(1, row_bytes))

    def blocks(self, block_bytes: int | None = None) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(states (layer, rows, width), the rows' coordinates) of each block of the selection, in order."""
        step = self.block_rows(block_bytes)
        coordinates = self.coordinates
        for first in range(0, len(self.rows), step):
            rows = self.rows[first : first + step]
            states = self.run.read_rows(self.layers, rows, self.site)
            yield states, {name: values[rows] for name, values in coordinates.items()}


def select(
    run: Run,
    site: str | None = None,
    layers: list[int] | slice | None = None,
    samples: list[int] | None = None,
    rows: tuple[int, int] | None = None,
) -> Selection:
    """The selection asked for, checked against the run: ``site`` (default: its first), ``layers`` (default:
    all), ``samples`` (ids: every row of each) or ``rows`` (START, STOP along the run's rows), by default every
    committed row. Raises ExchangeError naming what the run holds."""
    site = run.default_site if site is None else site
    if site not in run.sites:
        raise ExchangeError(str(SiteNotFound(run.key, site, list(run.sites))))
    n_layers = run.states(site).shape[0]
    if isinstance(layers, slice):
        layers = list(range(layers.start, layers.stop))
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ExchangeError(f"layers {bad or '(none)'}: run {run.key} has layers 0..{n_layers - 1}")
    if len(set(layers)) < len(layers):
        raise ExchangeError(f"layers {layers}: name each layer once")
    if samples is not None and rows is not None:
        raise ExchangeError("give sample ids or a range of rows, not both")
    return Selection(run, site, layers, _rows(run, samples, rows), {"samples": samples, "rows": rows})


def _rows(run: Run, samples: list[int] | None, span: tuple[int, int] | None) -> np.ndarray:
    n = run.n_samples
    if span is not None:
        start, stop = span
        if not 0 <= start < stop <= n:
            raise ExchangeError(f"rows {start}:{stop} are empty or outside the {n} rows of run {run.key} (0:{n})")
        return np.arange(start, stop)
    if samples is None:
        if n == 0:
            raise ExchangeError(f"run {run.key} holds no committed row yet")
        return np.arange(n)
    ids = run.labels()["sample"]
    wanted = np.asarray(samples, dtype=np.int64)
    missing = wanted[~np.isin(wanted, ids)]
    if len(missing):
        raise ExchangeError(f"{len(missing)} sample id(s) not in run {run.key}, e.g. {missing[:5].tolist()}")
    return np.flatnonzero(np.isin(ids, wanted))
