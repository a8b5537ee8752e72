"""A selection as a netCDF file that xarray opens: one variable of states (layer, rows, width), named after the
site (``hidden_states`` for a question run), with the rows' coordinates, as ``actstore query get --out x.nc``
writes it; the run's recipe and attributes as JSON text in the attributes ``recipe`` and ``run_attributes``,
and the export record without them in ``actstore``, each named in ``json_attributes`` as a store names its own::

    ds = xr.open_dataset(path)
    json.loads(ds.attrs["recipe"])

Without the netCDF4 or h5netcdf package xarray writes NetCDF 3 (64-bit offsets): no float16, so float16 states
are written as float32, exactly (``stored_dtype`` says so); no int64, so integer coordinates are written as
int32 where they fit; and at most 4 GiB a variable, checked before anything is read. The selection is
gathered in memory before it is written (xarray writes a variable whole): export larger selections to
Parquet or ``datasets``, or fewer layers.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import xarray as xr

from actstore.exchange.record import METADATA_KEY, export_record
from actstore.exchange.selection import ExchangeError, Selection

NETCDF3_VARIABLE_BYTES = 2**32 - 4  # the largest variable of a NetCDF 3 file with 64-bit offsets
Data = TypeVar("Data", xr.DataArray, xr.Dataset)


def with_provenance(data: Data, recipe: dict, attributes: dict, **more: Any) -> Data:
    """``data`` (a DataArray or Dataset) carrying the run's recipe (model and weights, method, site, dtype, ...)
    and attributes (provenance, history), and any ``more``, as JSON text named in ``json_attributes`` as a
    store does: a saved file says what made its numbers."""
    extra = {"recipe": json.dumps(recipe), "run_attributes": json.dumps(attributes, default=str)}
    extra.update({name: json.dumps(value, default=str) for name, value in more.items()})
    return data.assign_attrs({**extra, "json_attributes": " ".join(sorted(extra))})


def save_netcdf(data: Data, path: Path) -> None:
    """Write ``data`` and its attributes to ``path`` as netCDF; float16 as float32 where the format lacks it
    (exact: every float16 is a float32), the variable's ``stored_dtype`` saying so."""
    ds = data.to_dataset().assign_attrs(data.attrs) if isinstance(data, xr.DataArray) else data
    if _netcdf3():
        for name, variable in ds.data_vars.items():
            if variable.dtype == np.float16:
                ds[name] = variable.astype(np.float32).assign_attrs(variable.attrs, stored_dtype="float16")
    ds.to_netcdf(path)


def _netcdf3() -> bool:
    """Whether xarray writes NetCDF 3 here (its scipy engine): neither netCDF4 nor h5netcdf is installed."""
    return all(importlib.util.find_spec(name) is None for name in ("netCDF4", "h5netcdf"))


def states_dataset(selection: Selection, values: np.ndarray) -> xr.Dataset:
    """``values`` (layer, rows, width) of the selection as a Dataset of one variable with the rows' coordinates
    (a Dataset, as ``Run.to_xarray`` gives: a capture run's top logits have dimensions of their own)."""
    rows, dim = selection.rows, selection.row_dim
    coords: dict[str, Any] = {"layer": list(selection.layers)}
    for name, column in selection.coordinates.items():
        column = column[rows]
        if name == dim:
            coords[name] = column
        elif column.ndim == 1:
            coords[name] = (dim, column)
        else:
            coords[name] = ((dim, "letter" if name == "letter_logits" else "top"), column)
    if selection.letters:
        coords["letter"] = selection.letters
    coords[selection.width_dim] = np.arange(selection.width)
    run = selection.run
    name = "hidden_states" if run.capture is None else selection.site
    states = xr.Variable(("layer", dim, selection.width_dim), values, attrs={"site": selection.site})
    attrs = {"model": run.model, "method": run.method, "site": selection.site, "run_complete": run.complete}
    return xr.Dataset({name: states}, coords=coords, attrs=attrs)


def check_netcdf(selection: Selection) -> None:
    """Refuse, before anything is read, a selection too large for the netCDF format xarray writes here."""
    size = len(selection.layers) * len(selection.rows) * selection.width * 4  # float16 is widened
    if _netcdf3() and size > NETCDF3_VARIABLE_BYTES:
        raise ExchangeError(
            f"the selection's states take {size / 2**30:.1f} GiB, above the 4 GiB of a NetCDF 3 variable (install "
            "netCDF4 for NetCDF 4 files): export fewer --layers or rows, or use --format parquet or hf-datasets"
        )


def write_netcdf(selection: Selection, path: Path, advance: Callable[[int], object] = lambda n: None) -> None:
    """Write ``selection`` to the netCDF file ``path`` (see the module docstring), reading it in blocks."""
    check_netcdf(selection)
    values = np.empty((len(selection.layers), len(selection.rows), selection.width), dtype=selection.dtype)
    done = 0
    for states, _ in selection.blocks():
        values[:, done : done + states.shape[1]] = states
        done += states.shape[1]
        advance(states.shape[1])
    record = export_record(selection)
    recipe, attributes = record.pop("recipe"), record.pop("attributes")
    ds = with_provenance(states_dataset(selection, values), recipe, attributes, **{METADATA_KEY: record})
    save_netcdf(ds, path)
