"""One run: the hidden states of one model under one method, with labels and provenance.

A run of the study's multiple-choice questions (format 1) is the Zarr v3 group ``{model}/{method}``::

    hidden_states  (layer, sample, hidden)  float32, sharded, Blosc-compressed, CRC-32C per chunk
    layer          (layer,)                 0 = embeddings (site "residual") or block 0's input norm
    sample         (sample,)                the question's stable id in its dataset
    subject, answer, prediction (sample,)   strings; correct (sample,) bool

A capture run (format 2: any sites, any token positions, any text dataset) holds one states array per site,
along rows that are samples or tokens, with their coordinates: actstore.store.capture.

How samples are committed, and what plain readers see meanwhile: actstore.store.writer.

The shard record binds each shard file to its place (run, layer, shard) through the CRC of its index and,
for the last, partly filled inner chunk, of its committed values (StateReader.record); the fast reader
(actstore.store.reader) checks it on every read, in the server, Dask workers and scripts alike. Plain Zarr
readers check each chunk's CRC-32C but not the record, so they do not notice an intact shard copied from
elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing
from zarr.core.array import AsyncArray
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.errors import ContainsGroupError

from actstore.store.attributes import as_stored, encode, read_attr, read_attrs
from actstore.store.capture import CaptureLayout
from actstore.store.errors import RecipeMismatch, SiteNotFound, StoreError
from actstore.store.location import Location, join
from actstore.store.names import validate_name
from actstore.store.reader import StateReader

FORMAT_VERSION = 1
STATES = "hidden_states"
SHARD_RECORD = "shard_record"  # run attribute: every shard's index CRC-32C per layer, written at each commit
LABELS = {"sample": "int64", "subject": str, "answer": str, "prediction": str, "correct": "bool"}
TEXT_LABELS = ("subject", "answer", "prediction")
MAX_LABEL_CHARS = 256  # longer than any subject or answer of a multiple-choice dataset; bounds every label row
LABEL_COORDS = "subject answer prediction correct"
VISIBILITIES = ("private", "shared", "public")
DERIVED = "derived"
DEFAULT_ACCESS = {"owner_group": None, "visibility": "public", "shared_with": []}


def state_arrays(capture: CaptureLayout | None) -> tuple[str, ...]:
    """The states arrays of a run laid out as ``capture`` says (None: a run of the study's questions)."""
    return (STATES,) if capture is None else tuple(capture.sites)


def row_arrays(capture: CaptureLayout | None) -> tuple[str, ...]:
    """The arrays along a run's rows besides the states: labels, or a capture run's coordinates."""
    return tuple(LABELS) if capture is None else capture.row_arrays


class LabelTooLong(StoreError, ValueError):
    """A label string longer than a run stores (MAX_LABEL_CHARS)."""


def check_labels(labels: dict[str, np.ndarray]) -> None:
    """Raise LabelTooLong naming the first label longer than MAX_LABEL_CHARS characters.

    Labels travel in every answer about the run (one gRPC message carries a selection's labels): an
    unbounded string would make whole runs unservable. Checked before a batch is buffered, so nothing of it
    is written.
    """
    for name in TEXT_LABELS:
        lengths = np.fromiter((len(str(value)) for value in labels[name]), dtype=np.int64, count=len(labels[name]))
        if lengths.size and lengths.max() > MAX_LABEL_CHARS:
            at = int(lengths.argmax())
            raise LabelTooLong(
                f"the {name} of sample {labels['sample'][at]} has {lengths[at]:,} characters, above "
                f"the {MAX_LABEL_CHARS} a run stores: shorten it in the dataset"
            )


@dataclass(repr=False)
class Run:
    """One run as stored, limited to its committed samples: its states, labels and attributes are read
    here and written only by a RunWriter; the one thing written through a Run is its ``derived/`` cache of
    analyses (``save_derived``), which lies outside the committed samples and their snapshot."""

    location: Location
    group: zarr.Group
    model: str
    method: str

    def __repr__(self) -> str:
        layers, samples, hidden = self.shape
        state = "complete" if self.complete else "partial"
        accuracy = "" if self.accuracy is None else f", accuracy {self.accuracy:.3f}"
        return (
            f"<Run {self.key}: {layers} layers x {samples} samples x {hidden}, {state}{accuracy}; "
            f"store {self.location}>"
        )

    @property
    def key(self) -> str:
        """The run's place in its store's location: ``{model}/{method}``."""
        return join(self.model, self.method)

    @property
    def attrs(self) -> dict[str, Any]:
        return read_attrs(self.group)

    @property
    def n_samples(self) -> int:
        return int(read_attr(self.group, "progress")["n_committed"])

    @property
    def complete(self) -> bool:
        return bool(read_attr(self.group, "progress")["complete"])

    @property
    def accuracy(self) -> float | None:
        return read_attr(self.group, "accuracy")

    @cached_property
    def capture(self) -> CaptureLayout | None:
        """What a capture run stores (None for a run of the study's questions)."""
        record = read_attr(self.group, "capture", None)
        return None if record is None else CaptureLayout.from_record(record)

    @property
    def sites(self) -> dict[str, str]:
        """The run's sites, each with the name of the array holding it: the site name itself in a capture
        run, ``hidden_states`` in a run of the study's questions (which holds one site)."""
        if self.capture is not None:
            return {site: site for site in self.capture.sites}
        return {read_attr(self.group, "recipe", {}).get("site", "normed"): STATES}

    @property
    def state_arrays(self) -> tuple[str, ...]:
        return state_arrays(self.capture)

    @property
    def row_arrays(self) -> tuple[str, ...]:
        return row_arrays(self.capture)

    @property
    def row_dim(self) -> str:
        """``sample``, or ``token`` for a capture run storing several tokens per text."""
        return "sample" if self.capture is None else self.capture.rows

    @property
    def default_site(self) -> str:
        return next(iter(self.sites))

    @cached_property
    def hidden_states(self) -> zarr.Array:
        """The (first) site's states array with exactly the committed rows (whatever shape its metadata
        publishes)."""
        return self.states(self.default_site)

    def states(self, site: str) -> zarr.Array:
        """One site's states array with exactly the committed rows."""
        return self._states[self._array_of(site)]

    @cached_property
    def _states(self) -> dict[str, zarr.Array]:
        return {name: self._committed(name) for name in self.state_arrays}  # opened once: a snapshot

    def _array_of(self, site: str | None) -> str:
        if site is None:
            return self.state_arrays[0]
        if site not in self.sites:
            raise SiteNotFound(self.key, site, list(self.sites))
        return self.sites[site]

    def _committed(self, name: str) -> zarr.Array:
        return _past_the_end(self.group[name], self.n_samples)

    @cached_property
    def reader(self) -> StateReader:
        return self.reader_of(None)

    def reader_of(self, site: str | None) -> StateReader:
        """The checked fast reader of one site's states (the first site's by default)."""
        name = self._array_of(site)
        if name not in self._readers:
            record = read_attr(self.group, SHARD_RECORD)
            if self.capture is not None:
                record = (record or {}).get(name)
            self._readers[name] = StateReader(self._states[name], self.location, join(self.key, name), record)
        return self._readers[name]

    @cached_property
    def _readers(self) -> dict[str, StateReader]:
        return {}

    def read_states(
        self,
        layers: list[int],
        start: int = 0,
        stop: int | None = None,
        site: str | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Committed states of ``layers`` for rows ``start:stop`` as (layer, row, hidden), of ``site`` (by default
        the first): float32, or float16 where stored so; written into ``out`` when given (that shape and dtype).

        Much faster than slicing the states through zarr-python for whole layers and single samples.
        """
        stop = self.n_samples if stop is None else stop
        self._check_bounds(layers, start, stop, site)
        return self.reader_of(site).read(list(layers), start, stop, out)

    def _check_bounds(self, layers: list[int], start: int, stop: int, site: str | None = None) -> None:
        n = self.n_samples
        if not 0 <= start <= stop <= n:
            rows = "samples" if self.row_dim == "sample" else "tokens"
            raise IndexError(f"{rows} {start}:{stop} outside the {n} committed {rows} of {self.model}/{self.method}")
        n_layers = self.states(site or self.default_site).shape[0]
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise IndexError(f"layers {bad} outside 0..{n_layers - 1} of {self.model}/{self.method}")

    def encoded_states(self, layer: int, start: int, stop: int) -> Iterator[tuple[int, int, bytes | np.ndarray]]:
        """One layer's samples ``start:stop`` as stored Blosc chunks where whole, decoded rows at the ends.

        For servers that forward chunks without decoding them; see StateReader.encoded.
        """
        self._check_bounds([layer], start, stop)
        if not self.reader.direct:
            yield start, stop - start, self.reader.read([layer], start, stop)[0]
            return
        yield from self.reader.encoded(layer, start, stop)

    def read_rows(self, layers: list[int], positions: np.ndarray, site: str | None = None) -> np.ndarray:
        """States of ``layers`` at row ``positions`` (any order) of ``site`` (by default the first), as (layer,
        position, hidden): float32, or float16 where stored so.

        Neighbouring positions are read as one span, so memory is bounded by the span of the positions
        asked for: callers stream large selections in blocks.
        """
        positions = np.asarray(positions, dtype=np.int64)
        array = self.states(site or self.default_site)
        out = np.empty((len(layers), len(positions), array.shape[2]), dtype=array.dtype)
        if len(positions) == 0:
            return out
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        gap = array.chunks[1]  # farther apart than an inner chunk: read separately
        for span in np.split(np.arange(len(ordered)), np.nonzero(np.diff(ordered) > gap)[0] + 1):
            lo, hi = int(ordered[span[0]]), int(ordered[span[-1]]) + 1
            out[:, order[span]] = self.read_states(layers, lo, hi, site)[:, ordered[span] - lo]
        return out

    def content_key(self) -> str:
        """Identifies the run's committed content: runs only grow, so recipe + sample count pins the values."""
        recipe = json.dumps(read_attr(self.group, "recipe"), sort_keys=True)
        return hashlib.sha256(f"{recipe}|{self.n_samples}".encode()).hexdigest()[:16]

    def save_derived(self, kind: str, key: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Keep something computed from this run (a neighbour graph, analysis results) under ``derived/``.

        Arrays are written first and the attributes last, with ``complete`` set: a reader never takes
        a half-written entry. Writers of the same key write the same values, so races are harmless.
        Each axis of an array is named ``{array}_{axis}`` (Zarr's dimension_names, which xarray needs).
        """
        root = zarr.open_group(
            self.location.zarr_store(), path=self.key, mode="a", use_consolidated=False
        )  # derived/ lives outside the snapshot
        entry = _require_group(root, f"{DERIVED}/{validate_name(kind, 'kind')}/{validate_name(key, 'key')}")
        for name, values in arrays.items():
            entry.create_array(
                name,
                shape=values.shape,
                dtype=values.dtype,
                overwrite=True,
                chunks=values.shape or None,
                compressors=None,  # float64 noise: not compressible
                dimension_names=[f"{name}_{axis}" for axis in range(values.ndim)],
            )[...] = values
        entry.attrs.put(encode({**attrs, "complete": True}, {}))

    def load_derived(self, kind: str, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(arrays, attributes) saved under ``kind/key``, or None when absent or unfinished."""
        path = join(self.key, DERIVED, kind, key)
        if not self.location.exists(join(path, "zarr.json")):
            return None
        entry = zarr.open_group(self.location.zarr_store(), path=path, mode="r")
        attrs = read_attrs(entry)
        if not attrs.get("complete"):
            return None
        return {name: array[...] for name, array in entry.arrays()}, attrs

    @property
    def access(self) -> dict[str, Any]:
        """Who may read the run: ``owner_group``, ``visibility`` (private, shared, public), ``shared_with``."""
        return {**DEFAULT_ACCESS, **read_attr(self.group, "access", {})}

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, committed rows, width) of the first site."""
        n_layers, _, hidden = self.hidden_states.shape
        return (n_layers, self.n_samples, hidden)

    @property
    def n_texts(self) -> int:
        """How many samples (texts, questions) the committed rows belong to."""
        return int(read_attr(self.group, "progress").get("n_texts", self.n_samples))

    def check_recipe(self, recipe: dict[str, Any]) -> None:
        """Raise RecipeMismatch unless the run was made with ``recipe``."""
        stored = read_attr(self.group, "recipe")
        if stored != as_stored(recipe):
            raise RecipeMismatch(_mismatch_message(self.model, self.method, stored or {}, recipe))

    def labels(self) -> dict[str, np.ndarray]:
        """The coordinates of the committed rows, by name: a question run's labels; a capture run's sample,
        position, token id and label columns (read once per Run; do not modify)."""
        return self._labels

    def committed_samples(self) -> np.ndarray:
        """The ids of the samples whose rows are committed, each once."""
        ids = self.labels()["sample"]
        return ids if self.row_dim == "sample" else np.unique(ids)

    @cached_property
    def sample_order(self) -> np.ndarray:
        """``argsort`` of the sample ids, kept per Run: finds the positions of ids with a binary search."""
        return np.argsort(self.labels()["sample"], kind="stable")

    @cached_property
    def _labels(self) -> dict[str, np.ndarray]:
        n = self.n_samples
        return {name: self._committed(name)[:n] for name in self.row_arrays if self.group[name].ndim == 1}

    def size_bytes(self) -> int:
        return self.location.size(self.key)

    def to_xarray(self) -> xr.Dataset:
        """The run as an xarray Dataset as of one commit, its labels loaded and its states read lazily through
        the fast reader (checked like every read of it); ``.chunk()`` it for dask, or open it with
        ``xr.open_dataset(store, engine="actstore", group=key, chunks={})`` for dask chunks of one shard."""
        if self.capture is not None:
            return self._capture_to_xarray()
        labels = self.labels()
        n_layers, _, hidden = self.shape
        shard = self.hidden_states.shards or self.hidden_states.chunks
        preferred = {"layer": shard[0], "sample": shard[1], "hidden": hidden}
        states = xr.Variable(
            ("layer", "sample", "hidden"),
            indexing.LazilyIndexedArray(_RunStates(self)),
            encoding={"preferred_chunks": preferred},
        )
        coords = {"layer": np.arange(n_layers), "sample": labels["sample"]}
        coords.update({name: ("sample", labels[name]) for name in LABELS if name != "sample"})
        ds = xr.Dataset({STATES: states}, coords=coords, attrs=self.group.attrs.asdict())
        # indexed, the labels stay in memory when xarray chunks the rest, and .sel(subject=...) works
        for name in LABELS:
            ds = ds if name == "sample" else ds.set_xindex(name)
        return ds

    def _capture_to_xarray(self) -> xr.Dataset:
        """A capture run as one variable per site, named after it, with the rows' coordinates."""
        capture, rows = self.capture, self.row_dim
        variables = {}
        for site in capture.sites:
            array = self.states(site)
            shard = array.shards or array.chunks
            variables[site] = xr.Variable(
                ("layer", rows, capture.width_dim(site)),
                indexing.LazilyIndexedArray(_RunStates(self, site)),
                encoding={"preferred_chunks": {"layer": shard[0], rows: shard[1], capture.width_dim(site): shard[2]}},
            )
        n = self.n_samples
        coords = {"layer": np.arange(capture.n_layers)}
        coords.update({name: (rows, values) for name, values in self.labels().items()})
        if capture.top_k:
            coords.update({name: ((rows, "top"), self._committed(name)[:n]) for name in ("top_ids", "top_logits")})
        if capture.letters:
            coords["letter_logits"] = ((rows, "letter"), self._committed("letter_logits")[:n])
            coords["letter"] = ("letter", list(capture.letters))
        return xr.Dataset(variables, coords=coords, attrs=self.group.attrs.asdict())


class _RunStates(BackendArray):
    """The committed states of a run, read on indexing; xarray turns any index into slices and integers."""

    def __init__(self, run: Run, site: str | None = None) -> None:
        self.run, self.site = run, site
        array = run.states(site or run.default_site)
        self.shape = (array.shape[0], run.n_samples, array.shape[2])
        self.dtype = np.dtype(array.dtype)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._read)

    def _read(self, key: tuple[int | slice, ...]) -> np.ndarray:
        layer, sample, hidden = key
        layers = np.atleast_1d(np.arange(self.shape[0])[layer]).tolist()
        samples = range(self.shape[1])[sample] if isinstance(sample, slice) else range(sample, sample + 1)
        if not layers or not samples:
            values = np.empty((len(layers), len(samples), self.shape[2]), self.dtype)
        else:
            lo, hi = min(samples), max(samples) + 1
            rows = slice(None) if samples.step == 1 else np.asarray(samples) - lo
            values = self.run.read_states(layers, lo, hi, self.site)[:, rows]
        return values[_squeezed(layer, sample, hidden)]


def _squeezed(layer: int | slice, sample: int | slice, hidden: int | slice) -> tuple[Any, ...]:
    """The hidden index, with integer layer and sample axes dropped as numpy would."""
    return (0 if isinstance(layer, int) else slice(None), 0 if isinstance(sample, int) else slice(None), hidden)


def _require_group(root: zarr.Group, path: str) -> zarr.Group:
    """``require_group`` for several processes at once: Dask workers analysing layers of a fresh run create
    its ``derived/`` groups at the same moment, and zarr's check-then-create lets all but one fail with
    ContainsGroupError for a group that now exists. Each retry finds one more level made."""
    for _ in range(path.count("/") + 1):
        try:
            return root.require_group(path)
        except ContainsGroupError:
            continue
    return root.require_group(path)


def _sample_axis(metadata: ArrayV3Metadata) -> int:
    """The axis that grows: samples, or a capture run's tokens."""
    names = list(metadata.dimension_names)
    return names.index("sample") if "sample" in names else names.index("token")


def _rows(metadata: ArrayV3Metadata, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * _sample_axis(metadata) + (slice(start, stop),)


def _with_samples(metadata: ArrayV3Metadata, n: int) -> ArrayV3Metadata:
    shape = list(metadata.shape)
    shape[_sample_axis(metadata)] = n
    return metadata.update_shape(tuple(shape))


def _past_the_end(array: zarr.Array, n: int) -> zarr.Array:
    """``array`` as if it held ``n`` samples, its metadata unwritten: data written through it lands past the
    published end, where no reader looks until the commit publishes the new shape."""
    return zarr.Array(AsyncArray(metadata=_with_samples(array.metadata, n), store_path=array.store_path))


def _mismatch_message(model: str, method: str, stored: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    diffs = "; ".join(f"{k}: stored {stored.get(k)!r}, asked {wanted.get(k)!r}" for k in keys[:4])
    return (
        f"run {model}/{method} already exists with a different recipe ({diffs}). "
        "Use another --name or method, or --overwrite to replace it"
    )
