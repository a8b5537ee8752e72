"""Appending to a run: batches buffered, then committed atomically, with the writer lock held.

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
``consolidated=False``) take each array's own ``zarr.json`` instead: several files cannot change at once,
and a reader taking the arrays one by one across such writes would find two lengths ("conflicting sizes"
in xarray), so those files change only when a writing session starts (to the committed whole chunks) and
finishes (to every committed sample); such readers see the run as of the session's start (a read across
those few milliseconds may find two lengths), never a row without data. Shard files are rewritten whole, by a
temporary file renamed into place (zarr's LocalStore), so a crash or a full disk never damages a
committed sample. When the writer finishes, every committed sample is shown, the last partly filled
chunk too; the consolidated metadata stays, listing the arrays only, so plain readers neither warn nor
list the ``derived/`` entries analyses add. The next writer settles what a crash left.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import zarr
from zarr.core.group import AsyncGroup, ConsolidatedMetadata, GroupMetadata
from zarr.core.metadata.io import save_metadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync

from actstore.store.attributes import encode, read_attr
from actstore.store.capture import CAPTURE_FORMAT, CaptureLayout
from actstore.store.errors import StoreNotWritable
from actstore.store.layout import LABEL_CHUNK, STATE_DTYPE, StateLayout, state_compressors
from actstore.store.location import Location, Lock, join
from actstore.store.reader import StateReader
from actstore.store.run import (
    DERIVED,
    FORMAT_VERSION,
    LABEL_COORDS,
    LABELS,
    MAX_LABEL_CHARS,
    SHARD_RECORD,
    STATES,
    LabelTooLong,
    Run,
    _past_the_end,
    _require_group,
    _rows,
    _sample_axis,
    _with_samples,
    check_labels,
    row_arrays,
    state_arrays,
)
from actstore.store.shards import ShardWriter

log = logging.getLogger(__name__)


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


Batch = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # a batch's states (per array) and row labels


class RunWriter:
    """Appends batches to a run, committing them atomically; holds the run's writer lock from ``begin`` to
    ``close``.

    Begun before expensive work (loading a model), so that a second writer, or a writer of another recipe,
    is refused at once; ``start`` then lays the run out if it is new, with the shapes that only the loaded
    model knows, and publishes the session's start in one write. Batches are buffered in memory and
    committed every ``commit_seconds``, in the background while the next are computed (and on ``close``), so
    a kill loses at most about twice that much work while commits stay cheap. Use as a context manager. A write that
    fails (a full disk) raises StoreNotWritable, from the next ``add`` or ``close`` when it ran in the
    background, and leaves the run as of its last commit.
    """

    def __init__(
        self,
        location: Location,
        model: str,
        method: str,
        lock: Lock,
        recipe: dict[str, Any],
        run: Run | None,
        commit_seconds: float,
    ) -> None:
        self.location, self.model, self.method = location, model, method
        self.run = run  # None until ``start`` lays out a new (or overwritten) run
        self._capture = None if run is None else run.capture  # what a capture run stores (None: questions)
        self._lock = lock
        self._recipe = recipe
        self._commit_seconds = commit_seconds
        self._pending: list[Batch] = []
        self._last_commit = time.monotonic()
        self._failed = False
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="actstore-commit")
        self._committing: Future[list[Batch]] | None = None
        if run is not None:
            with self._writing():
                self._settle()

    @classmethod
    def begin(
        cls,
        root: Location,
        model: str,
        method: str,
        *,
        recipe: dict[str, Any],
        overwrite: bool = False,
        commit_seconds: float = 10.0,
    ) -> RunWriter:
        """Take ``model/method``'s writer lock and bring an existing run to its last commit (unless
        ``overwrite``, which replaces it at ``start``). Refuses a run whose recipe differs from ``recipe``:
        appending would mix two experiments."""
        lock = root.lock(join(model, method), f"run {model}/{method}", create=True)
        try:
            run = None if overwrite else _laid_out(root, model, method)
            if run is not None:
                run.check_recipe(recipe)
            return cls(root, model, method, lock, recipe, run, commit_seconds)
        except BaseException:
            lock.release()
            raise

    def start(
        self,
        *,
        provenance: dict[str, Any],
        n_layers: int = 0,
        hidden: int = 0,
        capture: CaptureLayout | None = None,
        attrs: dict[str, Any] | None = None,
        planned: int | None = None,
        history: dict[str, Any] | None = None,
    ) -> None:
        """Publish this writing session's start in one write of the run's metadata: ``attrs`` (settings of
        this session), how many samples the run will hold when it ends (``planned``; by default as
        recorded before) and a ``history`` entry kept with every earlier one. A new run (or one being overwritten)
        is laid out first, with ``n_layers`` x ``hidden`` states of the study's questions, or as ``capture``
        says, and its ``provenance`` (a run resumed keeps its own: where it came from, when it was created, who
        may read it), and marked usable by this write."""
        with self._writing():
            n, first = self.n_committed, {}
            if self.run is None:
                self.run = _recreate(self.location, self.model, self.method)
                if capture is None:
                    _create_arrays(self.run.group, n_layers, hidden, self._recipe.get("site", ""))
                else:
                    capture.create(self.run.group)
                self._capture = capture
                first = {**provenance, **_first_attrs(self.model, self.method, capture)}
            values = {**first, **(attrs or {})}
            if planned is not None:
                progress = first.get("progress") or read_attr(self.run.group, "progress")
                done = n if self._capture is None else progress["n_texts"]  # planned: samples, not rows
                values["progress"] = {**progress, "n_planned": planned, "complete": planned == done}
            if history is not None:
                values["history"] = [*read_attr(self.run.group, "history", []), history]
            self._publish(n, {**values, "recipe": self._recipe})

    @property
    def n_committed(self) -> int:
        return 0 if self.run is None else self.run.n_samples

    @property
    def stored_attrs(self) -> dict[str, Any]:
        """The run's attributes as stored before this session (none for a new run)."""
        return {} if self.run is None else self.run.attrs

    def committed_ids(self) -> np.ndarray:
        """The ids of the samples committed, each once (a capture run's tokens of a text are committed together)."""
        return np.zeros(0, dtype=LABELS["sample"]) if self.run is None else self.run.committed_samples()

    def add(self, states: np.ndarray | dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> None:
        """Buffer one batch of whole samples. For the study's questions ``states`` is (layer, batch, hidden) and
        ``labels`` has every LABELS name; for a capture run ``states`` has each site's (layer, rows, width) and
        ``labels`` every row array of its layout. Text labels hold at most MAX_LABEL_CHARS characters (else
        LabelTooLong, the batch not taken)."""
        if self.run is None:
            raise RuntimeError(f"run {self.model}/{self.method}: start() it before adding batches")
        if self._capture is None:
            check_labels(labels)
            states = {STATES: np.asarray(states, dtype=STATE_DTYPE)}
        else:
            _check_capture_batch(self._capture, self.run.key, states, labels)
        self._pending.append((states, labels))
        waited = time.monotonic() - self._last_commit
        if waited >= self._commit_seconds:
            # a partly filled chunk only once a whole one has been awaited for another interval
            self._commit_behind(whole_chunks=waited < 2 * self._commit_seconds)

    def commit(self, whole_chunks: bool = False) -> None:
        """Write the buffered batches past the published end, then publish them with one metadata write; after
        any commit still running in the background (whose error, if it failed, this raises).

        ``whole_chunks``: commit only up to the last whole inner chunk of states buffered, keeping the rest
        for the next commit, so that plain readers, who are shown whole chunks (``_whole_chunks``), see
        exactly the committed samples, during an ingest and after a kill; nothing when no whole chunk is
        buffered past the published end (``add`` then commits everything one interval later, so a kill loses
        at most about twice ``commit_seconds`` of work even when a chunk takes longer to fill).
        """
        self._await_commit()
        self._pending = self._commit(self._pending, whole_chunks)
        self._last_commit = time.monotonic()

    def _commit_behind(self, whole_chunks: bool) -> None:
        """``commit`` in the background, while the caller computes the next batches: where the model leaves CPU
        free (a GPU; one torch thread of two here), a capture then took 1.02x its forward alone against 1.08x
        (docs/benchmarks.md). One commit runs at a time: the next waits for it, which bounds the memory to two
        intervals' batches."""
        self._await_commit()
        batches, self._pending = self._pending, []
        self._committing = self._committer.submit(self._commit, batches, whole_chunks)
        self._last_commit = time.monotonic()

    def _await_commit(self) -> None:
        """Wait for the background commit, if any; its batches not committed go back in front of the buffer,
        and its error (a full disk, a lost lease) is raised here."""
        if self._committing is None:
            return
        committing, self._committing = self._committing, None
        self._pending = committing.result() + self._pending

    def _commit(self, batches: list[Batch], whole_chunks: bool) -> list[Batch]:
        """Commit ``batches`` (see ``commit``); returns those kept for the next commit."""
        if not batches:
            return []
        start = self.n_committed
        # the states stay in their batches (joining them would copy everything once more): see ShardWriter.write
        states = {k: [s[k] for s, _ in batches] for k in self._state_names}
        labels = {k: np.concatenate([lab[k] for _, lab in batches]) for k in self._row_names}
        stop = start + len(labels["sample"])
        rest: list[Batch] = []
        if self._capture is None and whole_chunks:  # a capture run's commits end with a sample instead
            if self._whole_chunks(stop) <= start:
                return batches
            if self._whole_chunks(stop) < stop:
                stop = self._whole_chunks(stop)
                kept = stop - start
                joined = {k: np.concatenate(v, axis=1) for k, v in states.items()}
                rest = [({k: v[:, kept:] for k, v in joined.items()}, {k: v[kept:] for k, v in labels.items()})]
                states = {k: [v[:, :kept]] for k, v in joined.items()}
                labels = {k: v[:kept] for k, v in labels.items()}
        values = {**labels, **states}
        with self._writing():
            for name in self._arrays:
                self._write_rows(name, values[name], start, stop)
            self._publish(stop, {**self._progress(stop, labels), **self._shard_record(stop)})
        return rest

    def _write_rows(self, name: str, values: np.ndarray | list[np.ndarray], start: int, stop: int) -> None:
        """Write rows ``start:stop`` of array ``name`` past the published end: states (a list of batches)
        sharded as the fast reader reads them through ShardWriter (shards.py: zarr-python writes them ~10x
        slower), the rest through zarr-python."""
        array = _past_the_end(self.run.group[name], stop)
        direct = ShardWriter.of(array, self.run.location, join(self.run.key, name))
        if direct is not None and name in self._state_names:
            direct.write(values, start, stop)
        else:
            joined = np.concatenate(values, axis=1) if isinstance(values, list) else values
            array[_rows(array.metadata, start, stop)] = joined

    def close(self) -> None:
        """Commit what is buffered (unless a write already failed), finish, and release the lock."""
        try:
            self._await_commit()
            if not self._failed and self.run is not None:
                self.commit()
                with self._writing():
                    self._finish()
        finally:
            self._committer.shutdown()
            self._lock.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Buffered batches are whole: keep them even when the ingest stops on an error or Ctrl-C.
        self.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            with _writing(f"{self.model}/{self.method}", self.n_committed):
                yield
        except StoreNotWritable:
            self._failed = True
            raise

    @property
    def _state_names(self) -> tuple[str, ...]:
        return state_arrays(self._capture)

    @property
    def _row_names(self) -> tuple[str, ...]:
        return row_arrays(self._capture)

    @property
    def _arrays(self) -> tuple[str, ...]:
        """Every array that grows with the rows, in the order commits write them: labels before states."""
        return (*self._row_names, *self._state_names)

    def _progress(self, n_committed: int, labels: dict[str, np.ndarray]) -> dict[str, Any]:
        progress = read_attr(self.run.group, "progress")
        if self._capture is not None:  # a capture run: samples counted apart from its rows; no answers
            new_texts = len(np.unique(labels["sample"]))
            progress.update(n_committed=n_committed, n_texts=progress.get("n_texts", 0) + new_texts)
            progress["complete"] = progress["n_texts"] >= progress.get("n_planned", progress["n_texts"])
            return {"progress": progress}
        n_correct = progress["n_correct"] + int(labels["correct"].sum())
        progress.update(
            n_committed=n_committed,
            n_correct=n_correct,
            complete=n_committed >= progress.get("n_planned", n_committed),
        )
        return {"progress": progress, "accuracy": n_correct / n_committed if n_committed else None}

    def _shard_record(self, n: int) -> dict[str, Any]:
        """The run's shard record at ``n`` rows, every shard in it (StateReader.record): published with the
        progress in one write, so that a reader checks each file against the record of the commit it serves,
        and a file with another index (intact bytes from another layer or run copied over) reads as corrupt.
        A capture run keeps one record per site."""
        stored = read_attr(self.run.group, SHARD_RECORD)
        records = {}
        for name in self._state_names:
            array = _past_the_end(self.run.group[name], n)
            reader = StateReader(array, self.run.location, join(self.run.key, name))
            if reader.direct:
                previous = stored if self._capture is None else (stored or {}).get(name)
                records[name] = reader.record(previous)
        if self._capture is None:
            return {SHARD_RECORD: records[STATES]} if records else {}
        return {SHARD_RECORD: records}

    def _publish(self, n: int, values: dict[str, Any], shown: int | None = None) -> None:
        """Commit ``n`` samples with the attributes ``values`` (the commit point): one write of the run group's
        zarr.json, holding every array's metadata as Zarr's consolidated metadata with ``shown`` samples (by
        default the whole inner chunks of states among the ``n``, see ``_whole_chunks``)."""
        self._lock.check()  # a bucket's lease may have expired and passed to another writer: publish nothing
        group = self.run.group
        arrays = {name: group[name].metadata for name in (*self._arrays, "layer")}
        shown = self._whole_chunks(n) if shown is None else shown
        arrays.update({name: _with_samples(arrays[name], shown) for name in self._arrays})
        self._write_group(values, ConsolidatedMetadata(arrays))

    def _whole_chunks(self, n: int) -> int:
        """``n`` rounded down to whole inner chunks of states: what plain readers are shown while a writer
        works. zarr-python reads a shard's index and then its chunks in separate reads, so a chunk that a
        later commit rewrites (the last, partly filled one) could be read torn; whole chunks keep their
        bytes at their offsets in every later version of the shard."""
        inner = max(self.run.group[name].chunks[1] for name in self._state_names)
        return n // inner * inner

    def _write_group(self, values: dict[str, Any], consolidated: ConsolidatedMetadata) -> None:
        group = self.run.group
        attributes = {**group.metadata.attributes, **encode(values, group.metadata.attributes)}
        metadata = GroupMetadata(attributes=attributes, consolidated_metadata=consolidated)
        sync(save_metadata(group.store_path, metadata))  # one file, replaced atomically by zarr's LocalStore
        self.run = replace(self.run, group=zarr.Group(AsyncGroup(metadata, group.store_path)))

    def _write_array_metadata(self, n: int) -> None:
        """Set each array's own zarr.json to ``n`` samples, for readers that skip the consolidated metadata;
        only at a session's start and end (see the module docstring)."""
        for name in self._arrays:
            own = zarr.open_array(self.run.group.store_path / name, mode="r+")
            if own.shape[_sample_axis(own.metadata)] != n:
                sync(save_metadata(own.store_path, _with_samples(own.metadata, n)))

    def _finish(self) -> None:
        """At the end of a writing session, every committed sample shown, the last partly filled inner chunk
        too (no writer rewrites it now): each array's own metadata, then the group's consolidated copy, which
        stays, so that plain readers open a finished run without a warning and without listing the
        ``derived/`` entries analyses add."""
        n = self.n_committed
        self._write_array_metadata(n)
        self._publish(n, {}, shown=n)

    def _settle(self) -> None:
        """Bring the run to its last commit: drop a crashed writer's temporary files and the data it wrote
        past the committed end, and publish the committed shapes, consolidated."""
        self.run.location.discard_partial_writes(self.run.key)
        n = self.n_committed
        for name in self._arrays:
            array = self.run.group[name]
            if array.shape[_sample_axis(array.metadata)] > n:
                log.info("dropping an uncommitted tail of %s left by an interrupted ingest", name)
            _drop_chunks_past(self.run.location, join(self.run.key, name), array.metadata, n)
        _require_group(zarr.open_group(self.run.group.store_path, mode="r+", use_consolidated=False), DERIVED)
        self._publish(n, {})
        self._write_array_metadata(self._whole_chunks(n))


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


def _laid_out(root: Location, model: str, method: str) -> Run | None:
    """The run ``model/method`` if one was laid out and marked usable (its recipe written), else None."""
    if not root.exists(join(model, method, "zarr.json")):
        return None
    group = zarr.open_group(root.zarr_store(), mode="a").require_group(model).require_group(method)
    return Run(location=root, group=group, model=model, method=method) if "recipe" in group.attrs else None


def _recreate(root: Location, model: str, method: str) -> Run:
    """Empty the run folder for a fresh run's arrays; not usable until its recipe is published."""
    root.clear(join(model, method))
    group = zarr.open_group(root.zarr_store(), mode="a").require_group(model).require_group(method)
    group.create_group(DERIVED)  # listed in the consolidated metadata; its entries are found in the folder
    return Run(location=root, group=group, model=model, method=method)


def _first_attrs(model: str, method: str, capture: CaptureLayout | None) -> dict[str, Any]:
    """What every new run records before its first commit."""
    if capture is not None:
        return {
            "actstore": {"format_version": CAPTURE_FORMAT, "kind": "capture"},
            "model": model,
            "method": method,
            "capture": capture.record(),
            "progress": {"n_committed": 0, "n_texts": 0, "n_planned": 0, "complete": False},
        }
    return {
        "actstore": {"format_version": FORMAT_VERSION, "kind": "run"},
        "model": model,
        "method": method,
        "progress": {"n_committed": 0, "n_correct": 0, "n_planned": 0, "complete": False},
        "accuracy": None,
    }


def _check_capture_batch(
    capture: CaptureLayout, run: str, states: dict[str, np.ndarray], rows: dict[str, np.ndarray]
) -> None:
    """A capture batch must hold every site and row array of the run's layout, with one length of rows; text
    labels are bounded as in every run (LabelTooLong)."""
    missing = sorted({*capture.sites} - set(states)) + sorted({*capture.row_arrays} - set(rows))
    if missing:
        raise ValueError(f"run {run}: the batch lacks {', '.join(missing)}")
    n = len(rows["sample"])
    lengths = {len(rows[k]) for k in capture.row_arrays} | {states[k].shape[1] for k in capture.sites}
    if lengths != {n}:
        raise ValueError(f"run {run}: the batch's arrays hold different numbers of rows ({sorted(lengths)})")
    for name, dtype in capture.labels.items():
        if dtype != "str" or not n:
            continue
        longest = max(range(n), key=lambda i: len(str(rows[name][i])))
        if len(str(rows[name][longest])) > MAX_LABEL_CHARS:
            raise LabelTooLong(
                f"the {name} of sample {rows['sample'][longest]} has {len(str(rows[name][longest])):,} "
                f"characters, above the {MAX_LABEL_CHARS} a run stores: shorten it in the dataset"
            )
