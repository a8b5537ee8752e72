"""``actstore import``: an Arrow cache written by ``datasets.Dataset.save_to_disk`` into a run of the store.

Two kinds of folder are taken, and nothing else:

- a SAELens activation cache (``CacheActivationsRunner``): one column named after a hook, e.g.
  ``blocks.6.hook_resid_post``, of ``Array2D(shape=(context_size, d_in))`` float32 or float16, each row a
  context of ``context_size`` tokens, and optionally ``token_ids``, ``context_size`` integers a row. It becomes
  a capture run of token rows (actstore.store.capture) with one site, named after the column (or ``--site``),
  and one layer: each cache row is a text, its ``sample`` the row's index, ``position`` the token's index in the
  context, ``token_id`` from ``token_ids`` or -1. A run's layers are numbered from 0, so the hook's layer
  (``--layer``, or read from the column's name) is kept in the recipe (``imported.layer``) rather than as the
  run's layer number;
- a folder ``actstore export --format hf-datasets`` wrote (actstore.exchange.hf_datasets): the run it was
  exported from, rebuilt from its record (a question run or a capture run; the layers exported, numbered from
  0, their numbers in the run kept in the recipe).

The recipe records where the values came from, so that rerunning the same import after an interruption
resumes it (texts are committed whole, in the cache's order), and another cache is refused under the same
name unless ``--overwrite``. Everything about the folder is checked before the store is touched.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from actstore.exchange.record import parse_record
from actstore.exchange.selection import BLOCK_BYTES, ExchangeError
from actstore.store import Store, echo, validate_name
from actstore.store.capture import CaptureLayout

log = logging.getLogger(__name__)

IMPORT_FORMATS = ("hf-datasets",)
TOKEN_IDS = "token_ids"
ACTIVATION_DTYPES = ("float32", "float16")  # what a run stores as is; bfloat16 is no Arrow type
_HOOK_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|h|layer)\.(\d+)(?:\.|$)")  # blocks.6.hook_resid_post
# Run attributes the store sets itself, left out of an imported run's provenance.
_STORE_SET = ("actstore", "model", "method", "recipe", "progress", "accuracy", "capture", "history", "json_attributes")


@dataclass
class Imported:
    """What an import added: the run, the texts (question samples: ``unit``) added and held, and its rows."""

    run: str
    added: int
    texts: int
    rows: int
    unit: str = "texts"


class _Plan:
    """A folder read and checked, ready to write: the run's recipe, provenance and layout, and its units (texts,
    or question samples) in order, read in blocks of whole units."""

    recipe: dict[str, Any]
    provenance: dict[str, Any]
    layout: CaptureLayout | None  # None: a question run
    n_layers: int
    hidden: int
    n_units: int

    def blocks(self, done: int) -> Iterator[tuple[Any, dict[str, np.ndarray], int]]:
        """(states, row arrays, units) of each block after the first ``done`` units."""
        raise NotImplementedError


def import_cache(
    store: Store,
    path: Path,
    model: str,
    method: str,
    *,
    fmt: str = "hf-datasets",
    column: str | None = None,
    layer: int | None = None,
    site: str | None = None,
    overwrite: bool = False,
) -> Imported:
    """Import the Arrow cache folder ``path`` as the run ``model/method`` (see the module docstring); a run of
    the same recipe is resumed, one of another refused unless ``overwrite``."""
    if fmt not in IMPORT_FORMATS:
        raise ExchangeError(f"unknown import format {fmt!r}: choose from {', '.join(IMPORT_FORMATS)}")
    validate_name(model, "model name")
    validate_name(method, "method")
    plan = plan_import(Path(path), column, layer, site)
    key = f"{model}/{method}"
    with store.writing(), store.begin_run(model, method, recipe=plan.recipe, overwrite=overwrite) as writer:
        done = len(writer.committed_ids())
        if writer.run is not None and done >= plan.n_units:
            log.info("%s: up to date, nothing to do", key)
            return _imported(store, model, method, 0)
        writer.start(
            provenance=plan.provenance,
            n_layers=plan.n_layers,
            hidden=plan.hidden,
            capture=plan.layout,
            planned=plan.n_units,
            history=_history(path, plan.n_units - done),
        )
        unit = "text" if plan.layout is not None else "sample"
        with tqdm(total=plan.n_units, initial=done, unit=unit, desc=key, mininterval=1.0) as bar:
            for states, rows, units in plan.blocks(done):
                writer.add(states, rows)
                writer.commit()
                bar.update(units)
    return _imported(store, model, method, plan.n_units - done)


def _imported(store: Store, model: str, method: str, added: int) -> Imported:
    run = store.run(model, method)
    return Imported(run.key, added, run.n_texts, run.n_samples, "texts" if run.capture is not None else "samples")


def plan_import(path: Path, column: str | None, layer: int | None, site: str | None) -> _Plan:
    """Read and check the folder ``path``: an export of actstore's, or a SAELens cache (``column``, ``layer``
    and ``site`` apply to the latter). Raises ExchangeError naming what is wrong."""
    dataset = _open(path)
    record = parse_record(dataset.info.description)
    if record is None:
        return _SAELensCache(dataset, path, column, layer, site)
    given = [flag for flag, value in (("--column", column), ("--layer", layer), ("--site", site)) if value is not None]
    if given:
        raise ExchangeError(f"{path} is an actstore export, imported as exported: {', '.join(given)} do not apply")
    return _Export(dataset, path, record)


def _open(path: Path):
    """The ``datasets.Dataset`` saved in the folder ``path``; ExchangeError for anything else."""
    try:
        import datasets
    except ImportError:
        raise ExchangeError("actstore import needs datasets: pip install 'actstore[ingest]'") from None

    if not path.is_dir():
        raise ExchangeError(f"{path} is not a folder: give the folder that datasets' save_to_disk wrote")
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise ExchangeError(
            f"{path} is not an Arrow cache: datasets' save_to_disk writes state.json, dataset_info.json and "
            "data-*.arrow files in it"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExchangeError(f"{path} cannot be read as an Arrow cache ({type(exc).__name__}: {exc})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise ExchangeError(
            f"{path} holds the splits {', '.join(dataset)}: give one split's folder, e.g. {path / next(iter(dataset))}"
        )
    if len(dataset) == 0:
        raise ExchangeError(f"{path} holds no rows")
    return dataset


class _SAELensCache(_Plan):
    """A SAELens activation cache: a hook's column of (context_size, d_in) per row, token ids optional."""

    def __init__(self, dataset, path: Path, column: str | None, layer: int | None, site: str | None) -> None:
        import datasets

        features = dataset.features
        grids = [name for name, feature in features.items() if isinstance(feature, datasets.Array2D)]
        if column is None:
            if len(grids) != 1:
                found = f"{len(grids)}: {', '.join(grids)}" if grids else f"none; its columns: {', '.join(features)}"
                raise ExchangeError(
                    f"{path} is neither an actstore export nor an activation cache of one 2-D column "
                    f"(Array2D(shape=(context_size, d_in))); 2-D columns: {found}; name one with --column"
                )
            column = grids[0]
        if column not in features:
            raise ExchangeError(f"{path} has no column {echo(column)}; its columns: {', '.join(features)}")
        feature = features[column]
        if not isinstance(feature, datasets.Array2D):
            raise ExchangeError(
                f"column {column!r} of {path} is not 2-D activations (Array2D(shape=(context_size, d_in))): {feature}"
            )
        if any(n is None for n in feature.shape):
            raise ExchangeError(
                f"column {column!r} of {path} has contexts of varying length ({feature}): an activation cache's "
                "contexts have one length"
            )
        if feature.dtype not in ACTIVATION_DTYPES:
            raise ExchangeError(
                f"column {column!r} of {path} holds {feature.dtype}: a run stores {' or '.join(ACTIVATION_DTYPES)}"
            )
        self.context, width = (int(n) for n in feature.shape)
        self.token_ids = TOKEN_IDS in features
        if self.token_ids:
            ids = features[TOKEN_IDS]
            if not (
                isinstance(ids, datasets.List)
                and ids.length == self.context
                and isinstance(ids.feature, datasets.Value)
                and ids.feature.dtype.startswith(("int", "uint"))
            ):
                raise ExchangeError(f"column {TOKEN_IDS!r} of {path} is not {self.context} integers a row: {ids}")
        if layer is None:
            found = _HOOK_LAYER.search(column)
            if found is None:
                raise ExchangeError(f"the layer cannot be read from the column name {column!r}: give it with --layer")
            layer = int(found.group(1))
        site = column if site is None else site
        self.dataset, self.column = dataset, column
        self.layout = CaptureLayout(
            rows="token", n_layers=1, hidden=width, sites={site: width}, store_dtype=feature.dtype
        )  # checks the site's name
        self.n_layers, self.hidden, self.n_units = 1, width, len(dataset)
        source = {
            "format": "saelens",
            "location": str(path.resolve()),
            "column": column,
            "layer": layer,
            "context_size": self.context,
            "width": width,
            "dtype": feature.dtype,
            "token_ids": self.token_ids,
            "rows": len(dataset),
        }
        self.recipe = {"imported": source, "sites": [site], "positions": "all", "store_dtype": feature.dtype}
        self.provenance = {
            "imported": source,
            "sites": {site: {"hook": column, "layer": layer}},
            "positions": "all",
            "created": _now(),
            "access": {"owner_group": None, "visibility": "public", "shared_with": []},
        }

    def blocks(self, done: int) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]]:
        site = next(iter(self.layout.sites))
        columns = [self.column, *([TOKEN_IDS] if self.token_ids else [])]
        rows = self.dataset.with_format("numpy", columns=columns)
        step = max(1, BLOCK_BYTES // (self.context * self.hidden * 4))
        for start in range(done, self.n_units, step):
            stop = min(start + step, self.n_units)
            block = rows[start:stop]
            n = stop - start
            states = np.asarray(block[self.column]).reshape(1, n * self.context, self.hidden)
            token_id = block[TOKEN_IDS].reshape(-1) if self.token_ids else np.full(n * self.context, -1)
            row_arrays = {
                "sample": np.repeat(np.arange(start, stop, dtype=np.int64), self.context),
                "position": np.tile(np.arange(self.context, dtype=np.int64), n),
                "token_id": np.asarray(token_id, dtype=np.int64),
            }
            yield {site: states}, row_arrays, n


class _Export(_Plan):
    """A folder of ``actstore export --format hf-datasets``: the run it holds, rebuilt from its record."""

    def __init__(self, dataset, path: Path, record: dict[str, Any]) -> None:
        self.dataset, self.record = dataset, record
        self.states = [record["columns"][str(layer)] for layer in record["layers"]]
        self.coordinates = list(record["coordinates"])
        missing = [name for name in (*self.coordinates, *self.states) if name not in dataset.column_names]
        if missing or len(dataset) != record["n_rows"]:
            raise ExchangeError(
                f"{path} does not hold what its actstore record lists (columns missing: {', '.join(missing) or '-'}; "
                f"{len(dataset)} rows of {record['n_rows']}): export the run again"
            )
        attributes = record["attributes"]
        self.n_layers, self.hidden = len(self.states), int(record["width"])
        self.layout = None
        if record["kind"] == "capture":
            capture = dict(attributes["capture"])
            self.layout = CaptureLayout.from_record(
                {**capture, "n_layers": self.n_layers, "sites": {record["site"]: self.hidden}}
            )
        source = {
            "format": "actstore-export",
            "location": str(path.resolve()),
            "run": f"{record['model']}/{record['method']}",
            "site": record["site"],
            "layers": record["layers"],
            "selection": record["selection"],
            "rows": record["n_rows"],
        }
        self.recipe = {**record["recipe"], "imported": source}
        kept = {k: v for k, v in attributes.items() if k not in _STORE_SET}
        self.provenance = {**kept, "imported": {**source, "history": attributes.get("history", [])}}
        samples = dataset.with_format("numpy", columns=["sample"])[:]["sample"]
        if self.layout is not None and self.layout.rows == "token":  # a text's rows are contiguous
            self.starts = np.flatnonzero(np.r_[True, samples[1:] != samples[:-1]])
        else:
            self.starts = np.arange(len(samples))
        self.n_units = len(self.starts)
        self.itemsize = np.dtype(record["dtype"]).itemsize

    def blocks(self, done: int) -> Iterator[tuple[Any, dict[str, np.ndarray], int]]:
        from actstore.exchange.arrow import to_numpy

        bounds = np.append(self.starts, len(self.dataset))
        step = max(1, BLOCK_BYTES // (self.n_layers * self.hidden * self.itemsize))
        table = self.dataset.with_format("arrow")
        unit = done
        while unit < self.n_units:
            end = int(np.searchsorted(bounds, bounds[unit] + step, side="right")) - 1
            end = min(max(end, unit + 1), self.n_units)  # whole texts, one at least
            block = table[int(bounds[unit]) : int(bounds[end])]
            states = np.stack([to_numpy(block.column(name)) for name in self.states])
            rows = {name: to_numpy(block.column(name)) for name in self.coordinates}
            yield (states if self.layout is None else {self.record["site"]: states}), rows, end - unit
            unit = end


def _history(path: Path, added: int) -> dict[str, Any]:
    versions = {}
    for package in ("actstore", "datasets", "pyarrow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"time": _now(), "selection": f"imported from {path}", "added": added, "versions": versions}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
