"""One run: the hidden states of one model under one method, with labels and provenance.

On disk a run is the Zarr v3 group ``{model}/{method}``::

    hidden_states  (layer, sample, hidden)  float32, sharded, Blosc-compressed, CRC-32C per chunk
    layer          (layer,)                 0 = embeddings (site "residual") or block 0's input norm
    sample         (sample,)                the question's stable id in its dataset
    subject, answer, prediction (sample,)   strings; correct (sample,) bool

The sample axis only grows, and only by whole commits. A commit writes the new samples past
the end that readers are shown, then publishes them with one atomic file replace: while a writer works,
the run group's ``zarr.json`` holds the attributes (``progress.n_committed`` and the ``shard_record`` of
that commit) and, as Zarr's consolidated metadata, every array's metadata with its shape. Readers that
open the group with it (xarray by default or with ``consolidated=True``, zarr-python, Run) therefore see
the run as of one commit and never a row whose data is missing. Plain readers are shown the committed
samples in whole inner chunks of states: zarr-python reads a shard's index and its chunks in separate
reads, and only a whole chunk keeps its bytes at its offset in every later version of its shard (a partly
filled chunk shown to it failed its checksum in about 1 read of 40 beside a fast writer). So timed commits
stop at the last whole inner chunk buffered and keep the rest for the next (``RunWriter.commit``): what plain
readers are shown is exactly what is committed, during an ingest and after a kill, unless an inner chunk
takes more than a commit interval to fill (then the partly filled chunk is committed an interval later and
joins the view when the next commit fills it). Readers that skip the consolidated metadata (xarray's
``consolidated=False``) take each array's own ``zarr.json``: those are set only when a writer starts and
finishes, since several files cannot change at once (set at every commit, 1 such read in 5 found two
lengths beside that writer); meanwhile, and after a kill until the next writer, they show the run as of the
last start or finish. Shard files are rewritten whole, by a temporary
file renamed into place (zarr's LocalStore), so a crash or a full disk never damages a committed sample.
When the writer finishes, each array's own ``zarr.json`` gets the final length and the group drops its
consolidated metadata (which would hide the ``derived/`` entries analyses add later); the next writer
settles what a crash left.

The shard record binds each shard file to its place (run, layer, shard) through the CRC of its index and,
for the last, partly filled inner chunk, of its committed values (StateReader.record); the fast reader
(actstore.store.reader) checks it on every read, in the server, Dask workers and scripts alike. Plain Zarr
readers check each chunk's CRC-32C but not the record, so they do not notice an intact shard copied from
elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.core.array import AsyncArray
from zarr.core.group import AsyncGroup, ConsolidatedMetadata, GroupMetadata
from zarr.core.metadata.io import save_metadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.errors import ContainsGroupError

from actstore.store.attributes import as_stored, encode, read_attr, read_attrs, write_attrs
from actstore.store.errors import RecipeMismatch, StoreError, StoreNotWritable
from actstore.store.layout import LABEL_CHUNK, STATE_DTYPE, StateLayout, state_compressors
from actstore.store.location import Location, Lock, join
from actstore.store.names import validate_name
from actstore.store.reader import StateReader

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATES = "hidden_states"
SHARD_RECORD = "shard_record"  # run attribute: every shard's index CRC-32C per layer, written at each commit
LABELS = {"sample": "int64", "subject": str, "answer": str, "prediction": str, "correct": "bool"}
TEXT_LABELS = ("subject", "answer", "prediction")
MAX_LABEL_CHARS = 256  # longer than any subject or answer of a multiple-choice dataset; bounds every label row
SAMPLE_ARRAYS = (*LABELS, STATES)  # published in this order: labels before states
LABEL_COORDS = "subject answer prediction correct"
VISIBILITIES = ("private", "shared", "public")
DERIVED = "derived"
DEFAULT_ACCESS = {"owner_group": None, "visibility": "public", "shared_with": []}


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
            raise LabelTooLong(f"the {name} of sample {labels['sample'][at]} has {lengths[at]:,} characters, above "
                               f"the {MAX_LABEL_CHARS} a run stores: shorten it in the dataset")


@dataclass(repr=False)
class Run:
    """A read-only view of one run, limited to its committed samples."""

    location: Location
    group: zarr.Group
    model: str
    method: str

    def __repr__(self) -> str:
        layers, samples, hidden = self.shape
        state = "complete" if self.complete else "partial"
        accuracy = "" if self.accuracy is None else f", accuracy {self.accuracy:.3f}"
        return (f"<Run {self.key}: {layers} layers x {samples} samples x {hidden}, {state}{accuracy}; "
                f"store {self.location}>")

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
    def hidden_states(self) -> zarr.Array:
        """The states array with exactly the committed samples (whatever shape its metadata publishes)."""
        return self._committed(STATES)  # opened once: a Run is a snapshot as of one commit

    def _committed(self, name: str) -> zarr.Array:
        return _past_the_end(self.group[name], self.n_samples)

    @cached_property
    def reader(self) -> StateReader:
        return StateReader(self.hidden_states, self.location, join(self.key, STATES), read_attr(self.group, SHARD_RECORD))

    def read_states(self, layers: list[int], start: int = 0, stop: int | None = None) -> np.ndarray:
        """Committed states of ``layers`` for samples ``start:stop`` as (layer, sample, hidden) float32.

        Much faster than slicing ``hidden_states`` through zarr-python for whole layers and single samples.
        """
        stop = self.n_samples if stop is None else stop
        self._check_bounds(layers, start, stop)
        return self.reader.read(list(layers), start, stop)

    def _check_bounds(self, layers: list[int], start: int, stop: int) -> None:
        n = self.n_samples
        if not 0 <= start <= stop <= n:
            raise IndexError(f"samples {start}:{stop} outside the {n} committed samples of {self.model}/{self.method}")
        n_layers = self.hidden_states.shape[0]
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

    def read_rows(self, layers: list[int], positions: np.ndarray) -> np.ndarray:
        """States of ``layers`` at sample ``positions`` (any order), as (layer, position, hidden) float32.

        Neighbouring positions are read as one span, so memory is bounded by the span of the positions
        asked for: callers stream large selections in blocks.
        """
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(layers), len(positions), self.hidden_states.shape[2]), dtype=np.float32)
        if len(positions) == 0:
            return out
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        gap = self.hidden_states.chunks[1]  # farther apart than an inner chunk: read separately
        for span in np.split(np.arange(len(ordered)), np.nonzero(np.diff(ordered) > gap)[0] + 1):
            lo, hi = int(ordered[span[0]]), int(ordered[span[-1]]) + 1
            out[:, order[span]] = self.read_states(layers, lo, hi)[:, ordered[span] - lo]
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
        root = zarr.open_group(self.location.zarr_store(), path=self.key, mode="a",
                               use_consolidated=False)  # derived/ lives outside the snapshot
        entry = _require_group(root, f"{DERIVED}/{validate_name(kind, 'kind')}/{validate_name(key, 'key')}")
        for name, values in arrays.items():
            entry.create_array(name, shape=values.shape, dtype=values.dtype, overwrite=True,
                               chunks=values.shape or None, compressors=None,  # float64 noise: not compressible
                               dimension_names=[f"{name}_{axis}" for axis in range(values.ndim)])[...] = values
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
        n_layers, _, hidden = self.hidden_states.shape
        return (n_layers, self.n_samples, hidden)

    def check_recipe(self, recipe: dict[str, Any]) -> None:
        """Raise RecipeMismatch unless the run was made with ``recipe``."""
        stored = read_attr(self.group, "recipe")
        if stored != as_stored(recipe):
            raise RecipeMismatch(_mismatch_message(self.model, self.method, stored or {}, recipe))

    def labels(self) -> dict[str, np.ndarray]:
        """The per-sample coordinates of the committed samples, by name (read once per Run; do not modify)."""
        return self._labels

    @cached_property
    def sample_order(self) -> np.ndarray:
        """``argsort`` of the sample ids, kept per Run: finds the positions of ids with a binary search."""
        return np.argsort(self.labels()["sample"], kind="stable")

    @cached_property
    def _labels(self) -> dict[str, np.ndarray]:
        n = self.n_samples
        return {name: self._committed(name)[:n] for name in LABELS}

    def size_bytes(self) -> int:
        return self.location.size(self.key)

    def to_xarray(self) -> xr.Dataset:
        """The run as a lazy xarray Dataset with named dimensions and coordinates, as of one commit.

        While a writer works, the shapes come from the consolidated metadata each commit writes, and cover
        the committed samples but those of the last, partly filled inner chunk (RunWriter._whole_chunks).
        """
        with warnings.catch_warnings():  # no consolidated metadata when no writer is at work: expected
            warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated metadata")
            ds = self.location.open_xarray(self.key)
        return ds.isel(sample=slice(0, self.n_samples))


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


def _create_arrays(group: zarr.Group, n_layers: int, hidden: int, site: str) -> None:
    layout = StateLayout(hidden)
    states = group.create_array(
        STATES,
        shape=(n_layers, 0, hidden),
        dtype=STATE_DTYPE,
        chunks=layout.chunks,
        shards=layout.shards,
        compressors=state_compressors(),  # Blosc, then a CRC-32C of each chunk
        fill_value=float("nan"),
        dimension_names=("layer", "sample", "hidden"),
        attributes={"coordinates": LABEL_COORDS, "site": site, "token_position": "last prompt token"},
    )
    log.debug("created %s with chunks %s, shards %s", states.path, layout.chunks, layout.shards)
    layer = group.create_array("layer", shape=(n_layers,), dtype="int64", dimension_names=("layer",))
    layer[:] = np.arange(n_layers)
    for name, dtype in LABELS.items():
        group.create_array(name, shape=(0,), dtype=dtype, chunks=(LABEL_CHUNK,), dimension_names=("sample",))
    group.create_group(DERIVED)  # listed in the consolidated metadata; its entries are found in the folder


class RunWriter:
    """Appends batches to a run, committing them atomically; holds the run's writer lock.

    Batches are buffered in memory and committed every ``commit_seconds`` (and on ``close``), so
    a kill loses at most that much work while commits stay cheap. Use as a context manager. A write
    that fails (a full disk) raises StoreNotWritable and leaves the run as of its last commit.
    """

    def __init__(self, run: Run, lock: Lock, commit_seconds: float) -> None:
        self.run = run
        self._lock = lock
        self._commit_seconds = commit_seconds
        self._pending: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self._last_commit = time.monotonic()
        self._failed = False
        with self._writing():
            self._settle()

    @classmethod
    def open(
        cls,
        root: Location,
        model: str,
        method: str,
        *,
        recipe: dict[str, Any],
        attrs: dict[str, Any],
        n_layers: int,
        hidden: int,
        overwrite: bool = False,
        commit_seconds: float = 10.0,
        lock: Lock | None = None,
    ) -> "RunWriter":
        """Open ``model/method`` for appending, creating it (or recreating it with ``overwrite``).

        Refuses a run whose recipe differs from ``recipe``: appending would mix two experiments. ``lock``:
        the run's lock taken beforehand (``Store.lock_run``), so that a second writer is refused before
        any expensive work; it is released with the writer.
        """
        lock = lock or root.lock(join(model, method), f"run {model}/{method}", create=True)
        try:
            with _writing(f"{model}/{method}", 0):
                group = zarr.open_group(root.zarr_store(), mode="a").require_group(model).require_group(method)
                if "recipe" not in group.attrs or overwrite:
                    group = _recreate(root, model, method, n_layers, hidden, recipe, attrs)
            run = Run(location=root, group=group, model=model, method=method)
            run.check_recipe(recipe)
            return cls(run, lock, commit_seconds)
        except BaseException:
            lock.release()
            raise

    @property
    def n_committed(self) -> int:
        return self.run.n_samples

    def committed_ids(self) -> np.ndarray:
        return self.run.labels()["sample"]

    def set_planned(self, n_planned: int) -> None:
        """Record how many samples the run will hold when this ingest ends."""
        progress = read_attr(self.run.group, "progress")
        progress.update(n_planned=n_planned, complete=n_planned == progress["n_committed"])
        self.update_attrs({"progress": progress})

    def update_attrs(self, values: dict[str, Any]) -> None:
        """Set run attributes (others kept) in one write of the run group's metadata."""
        with self._writing():
            self._publish(self.n_committed, values)

    def append_history(self, entry: dict[str, Any]) -> None:
        """Keep a record of every ingest that touched the run (selection, versions, time)."""
        self.update_attrs({"history": [*read_attr(self.run.group, "history", []), entry]})

    def add(self, states: np.ndarray, labels: dict[str, np.ndarray]) -> None:
        """Buffer one batch: ``states`` is (layer, batch, hidden); ``labels`` has every LABELS name, text labels
        of at most MAX_LABEL_CHARS characters (else LabelTooLong, the batch not taken)."""
        check_labels(labels)
        self._pending.append((np.asarray(states, dtype=STATE_DTYPE), labels))
        waited = time.monotonic() - self._last_commit
        if waited >= self._commit_seconds:
            # a partly filled chunk only once a whole one has been awaited for another interval
            self.commit(whole_chunks=waited < 2 * self._commit_seconds)

    def commit(self, whole_chunks: bool = False) -> None:
        """Write the buffered batches past the published end, then publish them with one metadata write.

        ``whole_chunks``: commit only up to the last whole inner chunk of states buffered, keeping the rest
        for the next commit, so that plain readers, who are shown whole chunks (``_whole_chunks``), see
        exactly the committed samples, during an ingest and after a kill; nothing when no whole chunk is
        buffered past the published end (``add`` then commits everything one interval later, so a kill loses
        at most about twice ``commit_seconds`` of work even when a chunk takes longer to fill).
        """
        if not self._pending:
            return
        start = self.n_committed
        values = {STATES: np.concatenate([s for s, _ in self._pending], axis=1)}
        values.update({k: np.concatenate([lab[k] for _, lab in self._pending]) for k in LABELS})
        stop = start + values[STATES].shape[1]
        rest: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        if whole_chunks and self._whole_chunks(stop) <= start:
            return
        if whole_chunks and self._whole_chunks(stop) < stop:
            stop = self._whole_chunks(stop)
            kept = stop - start
            rest = [(values[STATES][:, kept:], {k: values[k][kept:] for k in LABELS})]
            values = {name: value[:, :kept] if name == STATES else value[:kept] for name, value in values.items()}
        with self._writing():
            for name in SAMPLE_ARRAYS:
                array = self.run.group[name]
                _past_the_end(array, stop)[_rows(array.metadata, start, stop)] = values[name]
            self._publish(stop, {**self._progress(stop, int(values["correct"].sum())), **self._shard_record(stop)})
        self._pending = rest
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit what is buffered (unless a write already failed), finish, and release the lock."""
        try:
            if not self._failed:
                self.commit()
                with self._writing():
                    self._finish()
        finally:
            self._lock.release()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Buffered batches are whole: keep them even when the ingest stops on an error or Ctrl-C.
        self.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            with _writing(f"{self.run.model}/{self.run.method}", self.n_committed):
                yield
        except StoreNotWritable:
            self._failed = True
            raise

    def _progress(self, n_committed: int, new_correct: int) -> dict[str, Any]:
        progress = read_attr(self.run.group, "progress")
        n_correct = progress["n_correct"] + new_correct
        progress.update(
            n_committed=n_committed,
            n_correct=n_correct,
            complete=n_committed >= progress.get("n_planned", n_committed),
        )
        return {"progress": progress, "accuracy": n_correct / n_committed if n_committed else None}

    def _shard_record(self, n: int) -> dict[str, Any]:
        """The run's shard record at ``n`` samples, every shard in it (StateReader.record): published with the
        progress in one write, so that a reader checks each file against the record of the commit it serves,
        and a file with another index (intact bytes from another layer or run copied over) reads as corrupt."""
        reader = StateReader(_past_the_end(self.run.group[STATES], n), self.run.location, join(self.run.key, STATES))
        if not reader.direct:
            return {}
        return {SHARD_RECORD: reader.record(read_attr(self.run.group, SHARD_RECORD))}

    def _publish(self, n: int, values: dict[str, Any]) -> None:
        """Commit ``n`` samples with the attributes ``values`` (the commit point): one write of the run group's
        zarr.json, holding every array's metadata as Zarr's consolidated metadata, whose shapes show plain
        readers the whole inner chunks of states among them (see ``_whole_chunks``)."""
        self._lock.check()  # a bucket's lease may have expired and passed to another writer: publish nothing
        group = self.run.group
        arrays = {name: group[name].metadata for name in (*SAMPLE_ARRAYS, "layer")}
        shown = self._whole_chunks(n)
        arrays.update({name: _with_samples(arrays[name], shown) for name in SAMPLE_ARRAYS})
        self._write_group(values, ConsolidatedMetadata(arrays))

    def _whole_chunks(self, n: int) -> int:
        """``n`` rounded down to whole inner chunks of states: what plain readers are shown while a writer
        works. zarr-python reads a shard's index and then its chunks in separate reads, so a chunk that a
        later commit rewrites (the last, partly filled one) could be read torn; whole chunks keep their
        bytes at their offsets in every later version of the shard."""
        inner = self.run.group[STATES].chunks[1]
        return n // inner * inner

    def _write_group(self, values: dict[str, Any], consolidated: ConsolidatedMetadata | None) -> None:
        group = self.run.group
        attributes = {**group.metadata.attributes, **encode(values, group.metadata.attributes)}
        metadata = GroupMetadata(attributes=attributes, consolidated_metadata=consolidated)
        sync(save_metadata(group.store_path, metadata))  # one file, replaced atomically by zarr's LocalStore
        self.run = replace(self.run, group=zarr.Group(AsyncGroup(metadata, group.store_path)))

    def _write_array_metadata(self, n: int) -> None:
        """Set each array's own zarr.json to ``n`` samples (labels before states), for readers that skip
        consolidated metadata; written only while the consolidated metadata is in place."""
        for name in SAMPLE_ARRAYS:
            own = zarr.open_array(self.run.group.store_path / name, mode="r+")
            if own.shape[_sample_axis(own.metadata)] != n:
                sync(save_metadata(own.store_path, _with_samples(own.metadata, n)))

    def _finish(self) -> None:
        """At the end of a writing session: each array's own metadata at the committed length, then the
        group's without consolidated metadata (which would hide the ``derived/`` entries analyses add)."""
        self._write_array_metadata(self.n_committed)
        self._write_group({}, None)

    def _settle(self) -> None:
        """Bring the run to its last commit: drop a crashed writer's temporary files and the data it wrote
        past the committed end, and publish the committed shapes, consolidated."""
        self.run.location.discard_partial_writes(self.run.key)
        n = self.n_committed
        for name in SAMPLE_ARRAYS:
            array = self.run.group[name]
            if array.shape[_sample_axis(array.metadata)] > n:
                log.info("dropping an uncommitted tail of %s left by an interrupted ingest", name)
            _drop_chunks_past(self.run.location, join(self.run.key, name), array.metadata, n)
        _require_group(zarr.open_group(self.run.group.store_path, mode="r+", use_consolidated=False), DERIVED)
        self._publish(n, {})
        self._write_array_metadata(self._whole_chunks(n))


def _sample_axis(metadata: ArrayV3Metadata) -> int:
    return list(metadata.dimension_names).index("sample")


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


def _drop_chunks_past(location: Location, array: str, metadata: ArrayV3Metadata, n: int) -> None:
    """Delete the chunk (or shard) files of the array at key ``array`` that lie wholly past sample ``n``:
    what an interrupted commit wrote there is not part of the run."""
    axis = _sample_axis(metadata)
    per_file = metadata.chunk_grid.chunk_shape[axis]
    chunks = join(array, "c")
    for key in location.keys_below(chunks):
        if int(key.removeprefix(chunks + "/").split("/")[axis]) * per_file >= n:
            location.delete(key)


@contextlib.contextmanager
def _writing(run: str, n_committed: int) -> Iterator[None]:
    """A failed write (full disk, lost permission) as one StoreNotWritable naming what is kept."""
    try:
        yield
    except OSError as exc:
        raise StoreNotWritable(
            f"cannot write run {run}: {exc.strerror or exc}; the {n_committed} samples committed before are "
            "kept (free space or fix the store, then rerun the same command to resume)"
        ) from None


def _recreate(
    root: Location, model: str, method: str, n_layers: int, hidden: int, recipe: dict, attrs: dict
) -> zarr.Group:
    """Empty the run folder and lay out a fresh run; the recipe is written last, marking it usable."""
    root.clear(join(model, method))
    group = zarr.open_group(root.zarr_store(), mode="a").require_group(model).require_group(method)
    _create_arrays(group, n_layers, hidden, recipe.get("site", ""))
    first = {
        **attrs,
        "actstore": {"format_version": FORMAT_VERSION, "kind": "run"},
        "model": model,
        "method": method,
        "progress": {"n_committed": 0, "n_correct": 0, "n_planned": 0, "complete": False},
        "accuracy": None,
    }
    write_attrs(group, first)
    write_attrs(group, {"recipe": recipe})
    return group


def _mismatch_message(model: str, method: str, stored: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    diffs = "; ".join(f"{k}: stored {stored.get(k)!r}, asked {wanted.get(k)!r}" for k in keys[:4])
    return (
        f"run {model}/{method} already exists with a different recipe ({diffs}). "
        "Use another --name or method, or --overwrite to replace it"
    )
