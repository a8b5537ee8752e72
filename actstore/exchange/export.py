"""``actstore export``: a selection of a run to the formats users' tools read, its recipe and provenance along.

- ``parquet``: one file (pandas, pyarrow, polars, DuckDB, Spark): actstore.exchange.parquet;
- ``hf-datasets``: a ``datasets.save_to_disk`` folder: actstore.exchange.hf_datasets;
- ``netcdf``: one file for xarray, as ``actstore query get`` writes: actstore.exchange.netcdf.

Everything is checked (the run, site, layers, rows, the destination) before anything is read or written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from actstore.exchange.output import check_output, replacing
from actstore.exchange.selection import ExchangeError, Selection, select
from actstore.store import Store

log = logging.getLogger(__name__)

FORMATS = ("hf-datasets", "parquet", "netcdf")


def export_run(
    store: Store,
    model: str,
    method: str,
    fmt: str,
    out: Path,
    *,
    site: str | None = None,
    layers: list[int] | slice | None = None,
    samples: list[int] | None = None,
    rows: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> Selection:
    """Export the selection of ``model/method`` (see ``select``) to ``out`` as ``fmt``; returns the selection.
    ``out`` is replaced only with ``overwrite``, and only once the export is whole."""
    if fmt not in FORMATS:
        raise ExchangeError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    selection = select(store.run(model, method), site, layers, samples, rows)
    if fmt == "netcdf":
        from actstore.exchange.netcdf import check_netcdf

        check_netcdf(selection)
    out = Path(out)
    check_output(out, folder=fmt == "hf-datasets", overwrite=overwrite)
    writer = _writer(fmt)  # imported before anything is written: a missing package fails early
    key = selection.run.key
    log.info(
        "exporting %s: %d rows (%s) x %d layers of %s, %.1f MB of states, to %s",
        key,
        len(selection.rows),
        selection.row_dim,
        len(selection.layers),
        selection.site,
        selection.states_bytes / 1e6,
        out,
    )
    with (
        replacing(out) as (target, scratch),
        tqdm(total=len(selection.rows), unit="row", desc=key, mininterval=1.0) as bar,
    ):
        if fmt == "hf-datasets":
            writer(selection, target, scratch, bar.update)
        else:
            writer(selection, target, bar.update)
    return selection


def _writer(fmt: str):
    """The writing function of ``fmt``, its format's packages imported only when asked for; a package missing
    is one line naming the extra that brings it."""
    try:
        if fmt == "parquet":
            from actstore.exchange.parquet import write_parquet

            return write_parquet
        if fmt == "hf-datasets":
            from actstore.exchange.hf_datasets import write_hf_dataset

            return write_hf_dataset
    except ImportError as exc:
        raise ExchangeError(f"--format {fmt} needs {exc.name}: pip install 'actstore[ingest]'") from None
    from actstore.exchange.netcdf import write_netcdf

    return write_netcdf
