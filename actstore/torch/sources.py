"""Where a dataset's rows come from: a store (a folder or a bucket), or a server through the client.

A source is made in the main process, where it pins the run as it is then (how many rows; the run's identity),
and is pickled to each DataLoader worker, which opens the run again for itself. Rows appended later are not
read (every reader sees the same snapshot), and a run replaced meanwhile is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actstore.client import Client
from actstore.client.requests import sample_selection, states_request
from actstore.client.states import header_coords
from actstore.store import LabelNotFound, SiteNotFound, Store, StoreError
from actstore.store.layout import StateLayout
from actstore.v1 import actstore_pb2 as pb

CORE = ("sample", "position")  # every item has them: the row's text (question) and token position
# A block read through a server (as float32): each call costs a round trip and a selection, ~3 ms here, so
# blocks are larger than a shard; but a shuffled window mixes as many places in the run as it holds blocks.
# A pass in stored order mixes nothing, and reads blocks four times larger (~1.15x the tokens/s of 16 MB ones).
REMOTE_BLOCK_BYTES = 16 << 20
REMOTE_PASS_BYTES = 64 << 20


class RunChanged(StoreError):
    """The run was replaced (or shrunk) since the dataset was made: its rows are not the ones planned."""


@dataclass
class Rows:
    """A block of rows: ``states`` (layer, row, hidden), and one array (row,) per coordinate."""

    states: np.ndarray
    coords: dict[str, np.ndarray]


@dataclass
class RunSpec:
    """What a dataset reads: one site of a run, at some layers, with the label columns asked for."""

    model: str
    method: str
    site: str | None
    layers: list[int]
    labels: tuple[str, ...] = ()


@dataclass
class Pinned:
    """The run as the main process saw it: rows read, width, the stored dtype, rows read at once (shuffled, and
    in stored order), string labels' categories."""

    n_rows: int
    hidden: int
    dtype: str
    block_rows: int
    pass_rows: int
    identity: str
    categories: dict[str, list[str]] = field(default_factory=dict)


def _categories(coords: dict[str, np.ndarray], labels: tuple[str, ...]) -> dict[str, list[str]]:
    """Each text label's values, sorted: items carry a value's index here, as torch tensors hold no strings."""
    return {name: sorted(map(str, np.unique(coords[name]))) for name in labels if coords[name].dtype.kind in "OUT"}


def row_coords(coords: dict[str, np.ndarray], spec: RunSpec, pinned: Pinned) -> dict[str, np.ndarray]:
    """The coordinates an item carries, as numbers: sample, position (-1 where a row is a whole question) and
    the labels asked for, text labels as their index in ``pinned.categories``."""
    n = len(coords["sample"])
    out = {"position": np.full(n, -1, dtype=np.int64)}
    for name in (*CORE, *spec.labels):
        values = coords.get(name)
        if name in pinned.categories:
            values = np.searchsorted(np.asarray(pinned.categories[name]), values.astype(str)).astype(np.int64)
        if values is not None:
            out[name] = values
    return out


class LocalSource:
    """Rows read from a store through the checked fast reader (every chunk's CRC-32C, every shard's record)."""

    def __init__(self, store: Store | str | os.PathLike[str], spec: RunSpec) -> None:
        store = store if isinstance(store, Store) else Store(store)
        self.url = store.url
        self.storage_options = getattr(store.location, "storage_options", None)
        self.spec = spec
        run = store.run(spec.model, spec.method)
        spec.site = spec.site or run.default_site
        array = run.states(spec.site)
        self._check(run, spec)
        labels = run.labels()
        self.pinned = Pinned(
            n_rows=run.n_samples,
            hidden=array.shape[2],
            dtype=str(array.dtype),
            block_rows=(array.shards or array.chunks)[1],
            pass_rows=(array.shards or array.chunks)[1],
            identity=_identity(run),
            categories=_categories(labels, spec.labels),
        )
        self._opened: tuple[int, Any] | None = (os.getpid(), run)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}  # each process opens the run for itself

    @property
    def description(self) -> str:
        return f"run {self.spec.model}/{self.spec.method} in store {self.url}"

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> Rows:
        """Rows ``lo:hi``; their states decoded into ``out`` when given ((layer, row, hidden) of the stored dtype)."""
        run = self._run()
        states = run.read_states(self.spec.layers, lo, hi, self.spec.site, out)
        return self._rows(states, run.labels(), slice(lo, hi))

    def read_rows(self, rows: np.ndarray) -> Rows:
        """Rows at any positions (for map-style datasets)."""
        run = self._run()
        return self._rows(run.read_rows(self.spec.layers, rows, self.spec.site), run.labels(), rows)

    def _rows(self, states: np.ndarray, labels: dict[str, np.ndarray], rows: slice | np.ndarray) -> Rows:
        wanted = {name: labels[name][rows] for name in (*CORE, *self.spec.labels) if name in labels}
        return Rows(states, row_coords(wanted, self.spec, self.pinned))

    def _run(self) -> Any:
        if self._opened is None or self._opened[0] != os.getpid():
            run = Store(self.url, self.storage_options).run(self.spec.model, self.spec.method)
            if _identity(run) != self.pinned.identity or run.n_samples < self.pinned.n_rows:
                raise RunChanged(
                    f"{self.description} was replaced since this dataset was made ({self.pinned.n_rows:,} rows "
                    f"then, {run.n_samples:,} now): make the dataset again"
                )
            self._opened = (os.getpid(), run)
        return self._opened[1]

    @staticmethod
    def _check(run: Any, spec: RunSpec) -> None:
        n_layers = run.states(spec.site).shape[0]
        bad = [layer for layer in spec.layers if not 0 <= layer < n_layers]
        if bad:
            raise IndexError(f"layers {bad} outside 0..{n_layers - 1} of run {run.key}")
        labels = run.labels()
        missing = [name for name in spec.labels if name not in labels]
        if missing:
            raise LabelNotFound(run.key, missing[0], [name for name in labels if name not in CORE])


def _identity(run: Any) -> str:
    """What tells this run from another written at the same place: its recipe and first writing session."""
    attrs = run.attrs
    return json.dumps([attrs.get("recipe"), (attrs.get("history") or [None])[0]], sort_keys=True, default=str)


class RemoteSource:
    """Rows read from an actstore server: the server checks the bytes and the caller's access."""

    def __init__(self, client: Client, spec: RunSpec, token: str | None = None, tls: bool | str = False) -> None:
        """``token`` and ``tls``: the client's, for the connection each DataLoader worker opens (a client keeps
        its token to itself)."""
        self.address, self._token, self._tls = client.address, token, tls
        info = client.describe(spec.model, spec.method)
        self.capture = info["kind"] == "capture"
        sites = {site["name"]: site for site in info["sites"] or []}
        spec.site = spec.site or next(iter(sites), None)
        if self.capture and spec.site not in sites:
            raise SiteNotFound(f"{spec.model}/{spec.method}", spec.site, list(sites))
        self.spec = spec
        labels = client.labels(spec.model, spec.method)
        coords = {name: labels[name].values for name in labels.coords}
        missing = [name for name in spec.labels if name not in coords]
        if missing:
            held = [name for name in coords if name not in CORE]
            raise LabelNotFound(f"{spec.model}/{spec.method}", missing[0], held)
        hidden = int(sites[spec.site]["width"]) if self.capture else int(info["hidden"])
        attrs = info["attributes"]
        self.pinned = Pinned(
            n_rows=int(info["n_samples"]),
            hidden=hidden,
            dtype="float16" if info["store_dtype"] == "float16" else "float32",  # bfloat16 is kept in float32
            block_rows=max(StateLayout(hidden).shard_samples, REMOTE_BLOCK_BYTES // (4 * hidden)),
            pass_rows=max(StateLayout(hidden).shard_samples, REMOTE_PASS_BYTES // (4 * hidden)),
            identity=json.dumps([info["recipe"], (attrs.get("history") or [None])[0]], sort_keys=True, default=str),
            categories=_categories(coords, spec.labels),
        )
        self._sample_ids = None if self.capture else coords["sample"]  # a question run selects rows by sample id
        self._client: tuple[int, Client] | None = (os.getpid(), client)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def description(self) -> str:
        return f"run {self.spec.model}/{self.spec.method} at {self.address}"

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> Rows:
        """Rows ``lo:hi``; their states decoded into ``out`` when given."""
        rows = slice(lo, hi)
        return self._read(sample_selection(None, {}, tokens=rows) if self.capture else sample_selection(rows, {}), out)

    def read_rows(self, rows: np.ndarray) -> Rows:
        """Rows at any positions (for map-style datasets), in one call: each row once, in stored order (a
        server refuses repeated sample ids), then put in the order asked."""
        unique, order = np.unique(rows, return_inverse=True)
        if self._sample_ids is None:
            read = self._read(sample_selection(None, {}, rows=unique))
        else:
            read = self._read(sample_selection(self._sample_ids[unique], {}))
        return Rows(read.states[:, order], {name: values[order] for name, values in read.coords.items()})

    def _read(self, samples: pb.SampleSelection, out: np.ndarray | None = None) -> Rows:
        """One call, without a DataArray (milliseconds an answer, as much as reading a few MB)."""
        request = states_request(self.spec.model, self.spec.method, self.spec.layers, self.spec.site, samples)
        header, states = self._connection().read_states(request, out)
        return Rows(states, row_coords(header_coords(header), self.spec, self.pinned))

    def _connection(self) -> Client:
        if self._client is None or self._client[0] != os.getpid():
            self._client = (os.getpid(), Client(self.address, token=self._token, tls=self._tls))
        return self._client[1]
