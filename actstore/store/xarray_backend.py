"""xarray's ``engine="actstore"``: a run opened through actstore's checked reader.

``xr.open_zarr`` reads a run too (no actstore needed), but it checks only each chunk's CRC, splits the
states into dask chunks of one inner chunk (16 samples for SmolLM2: hundreds of tasks for a layer mean) and
leaves the labels lazy, so ``groupby("subject")`` needs a ``.compute()`` first. With actstore installed::

    ds = xr.open_dataset("actstore-data", engine="actstore", group="model/method", chunks={})

reads the states through the fast reader (chunk CRCs and the shard record checked, CorruptData on a
mismatch), in dask chunks of one shard (one layer by 1,024 samples) with ``chunks={}`` (lazily, without
dask, otherwise), with the labels loaded: a snapshot of the run as of its last commit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import xarray as xr
from xarray.backends import BackendEntrypoint

from actstore.store.store import Store


class ActstoreBackend(BackendEntrypoint):
    """``xr.open_dataset(store, engine="actstore", group="model/method")``; see the module's docstring."""

    description = "Open a run of an actstore store through actstore's checked reader"
    open_dataset_parameters = ("filename_or_obj", "group", "drop_variables", "storage_options")

    def open_dataset(
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        group: str,
        drop_variables: str | Iterable[str] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> xr.Dataset:
        model, _, method = str(group).strip("/").partition("/")
        if not method or "/" in method:
            raise ValueError(f"group must be 'model/method', not {group!r}")
        ds = Store(filename_or_obj, storage_options).run(model, method).to_xarray()
        return ds.drop_vars(drop_variables or [], errors="ignore")

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return False  # a store is a Zarr folder like any other: ask for engine="actstore" by name
