"""Fast reads of sharded hidden states, for the two access patterns the layout was chosen for.

zarr-python decodes a shard's inner chunks one by one through its async codec pipeline, which costs
about 0.3 ms per inner chunk here: a whole layer (576 inner chunks) reads at ~110 MB/s and one
sample across 31 layers takes ~30 ms. This reader follows the Zarr v3 sharding spec directly: it reads
each shard's index once (cached while the file is unchanged), fetches only the inner chunks a request
needs, in one read per shard (``pread`` in a folder, a byte-range GET in a bucket, several shards at once),
and decodes them with Blosc in a thread pool (Blosc releases the GIL). Arrays with any other codec chain are
read through zarr-python.

Every byte is verified on every read, as zarr-python would: the shard index's CRC-32C, the CRC-32C of each
inner chunk where the array has one (runs written since chunks carry it; older runs have none), and each
Blosc frame's sizes; and each shard against the shard record of the commit the reader serves (its index;
the values of the last, partly filled inner chunk: see ``StateReader.record``), which catches intact bytes
from elsewhere (another layer's or run's shard copied over), the last, partly filled shard included. A
whole shard read again is checked in one pass over its bytes instead of chunk by chunk (see
``_read_chunks``). Bytes that fail, on either path, raise CorruptData naming the run, the layer and the
samples.
"""

from __future__ import annotations

import functools
import json
import logging
import zlib
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from typing import TypeVar

import numcodecs
import numpy as np
import zarr

from actstore.pools import ForkSafePool, cores
from actstore.store.checksum import CRC_BYTES, ChunkMismatch, Mismatch, chunk_frames, span_crc, table_crc
from actstore.store.errors import CorruptData
from actstore.store.location import Location, ShardBytes, join
from actstore.store.shard_format import CHECKSUMMED, MISSING, PLAIN, Index, inner_codecs, parse_index

log = logging.getLogger(__name__)

_PARALLEL_BYTES = 4 << 20
_POOL = ForkSafePool(max_workers=max(2, cores()), thread_name_prefix="actstore-decode")
_REQUESTS = ForkSafePool(max_workers=32, thread_name_prefix="actstore-get")  # a bucket's round trips overlap
numcodecs.blosc.set_nthreads(1)  # parallelism comes from decoding several chunks at once

T = TypeVar("T")


def _layers_text(layers: list[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"


def _prefetched(fetch: Callable[[int], T], items: range, ahead: int = 4) -> Iterator[T]:
    """``map(fetch, items)`` with up to ``ahead`` fetches in flight: a bucket's round trips overlap while the
    caller sends what came back, and memory stays bounded by ``ahead`` shards."""
    pending: deque[Future[T]] = deque()
    for item in items:
        pending.append(_REQUESTS.submit(fetch, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _filled(out: np.ndarray, values: np.ndarray) -> np.ndarray:
    out[...] = values
    return out


class _StaleIndex(Exception):
    """Bytes that fail their checks under a cached index that may be older than the object."""


class StateReader:
    """Reads (layer, row range) blocks of a (layer, row, hidden) float array; rows are samples or tokens
    (the code says samples for both)."""

    def __init__(self, array: zarr.Array, location: Location, key: str, record: dict | None = None) -> None:
        """``key``: the array's key in ``location`` ({model}/{method}/{array} in a store). ``record``: the run's
        shard record as of the commit ``array``'s shape shows (see ``record``), checked against every shard's
        index; one made for another layout of the array (its states stored again) is ignored."""
        self.array = array
        self.location, self.key = location, key
        self._chunk_keys = join(key, "c")
        self.run_name = key.rpartition("/")[0] or key
        inner = inner_codecs(array)
        self.direct = inner in (PLAIN, CHECKSUMMED)
        self.chunk_crc = inner == CHECKSUMMED
        if self.direct:
            self.shard_samples = array.shards[1]
            self.inner_samples = array.chunks[1]
            self.hidden = array.shape[2]
            self.dtype = np.dtype(array.dtype).newbyteorder("<")
            self.chunk_bytes = self.inner_samples * self.hidden * self.dtype.itemsize  # edge chunks: stored whole
        self.shard_record = record if record and record["layout"] == self._layout_key() else None
        self._committed: list[list[int]] = self.shard_record["index_crc32c"] if self.shard_record else []
        self._partial: dict | None = self.shard_record.get("partial") if self.shard_record else None
        self._indexes: dict[str, tuple[Hashable | None, Index]] = {}  # by shard key, with its version; GIL-safe

    def read(self, layers: list[int], start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """States of ``layers`` for samples ``start:stop``, shape (len(layers), stop - start, hidden): in ``out``
        when given (of that shape and the stored dtype), so that a caller gathering blocks saves a copy."""
        if not self.direct:
            values = self._read_through_zarr(layers, start, stop)
            return values if out is None else _filled(out, values)
        shape = (len(layers), stop - start, self.hidden)
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype:
            raise ValueError(f"out is {out.dtype} {out.shape}; reading {shape} of {self.dtype} states")
        shards = range(start // self.shard_samples, -(-stop // self.shard_samples))
        tasks = [(layer, shard, out[i], start, stop) for i, layer in enumerate(layers) for shard in shards]
        if len(tasks) == 1 or (self.location.local and out.nbytes < _PARALLEL_BYTES):  # no hand-off pays
            for task in tasks:
                self._read_shard(*task)
        else:
            pool = _POOL if self.location.local else _REQUESTS
            for job in [pool.submit(self._read_shard, *task) for task in tasks]:
                job.result()
        return out

    def encoded(self, layer: int, start: int, stop: int) -> Iterator[tuple[int, int, bytes | np.ndarray]]:
        """Samples ``start:stop`` of one layer as (first sample, number of samples, payload) pieces in order.

        Inner chunks that lie wholly inside the range come as their stored Blosc frames, verified and without
        the chunk checksum (clients decode Blosc frames, whichever layout the run has); the partial chunks
        at the ends come decoded, as (rows, hidden) arrays. Needs a direct-readable array.
        """
        shards = range(start // self.shard_samples, -(-stop // self.shard_samples))
        fetch = functools.partial(self._chunks_of, layer, start=start, stop=stop)
        for pieces in map(fetch, shards) if self.location.local else _prefetched(fetch, shards):
            for c_lo, c_hi, c_first, frame in pieces:
                if frame is not None and c_lo == c_first and c_hi - c_lo == self.inner_samples:
                    yield c_lo, c_hi - c_lo, bytes(frame)
                else:
                    yield c_lo, c_hi - c_lo, self._decode(layer, c_first, frame, c_lo, c_hi)

    def record(self, previous: dict | None) -> dict:
        """The shard record of the array as its shape shows it (a commit's samples), for the commit to publish.

        Per shard, the last one partly filled included, the CRC-32C stored with its index (a shard file's last
        4 bytes) in each layer; the index holds each inner chunk's offset and size, so another file (intact
        bytes from another layer, shard or run copied over) has another index. For the partly filled shard,
        also the CRC of its index entries of whole chunks (``partial``): the next commit rewrites that shard,
        and a reader still serving this commit must take the new file, whose whole chunks keep their entries;
        and the CRC of the values of its partly filled inner chunk's committed rows, which bind that chunk in
        every version (its one index entry, a compressed size, binds it weakly). No place is mixed into the
        CRCs: a reader checks the file it finds at a place against that place's entry. Entries of shards full
        in ``previous`` (this array's record at the last commit) are kept unread.
        """
        if previous is None or previous["layout"] != self._layout_key():
            previous = {"index_crc32c": []}
        kept = previous["index_crc32c"][: -1 if previous.get("partial") else None]
        n = self.array.shape[1]
        shards = range(len(kept), -(-n // self.shard_samples))
        indexes = [[self._stored_index(layer, shard) for layer in range(self.array.shape[0])] for shard in shards]
        record = {
            "layout": self._layout_key(),
            "index_crc32c": kept + [[int.from_bytes(raw[-CRC_BYTES:], "little") for raw in shard] for shard in indexes],
        }
        if n % self.shard_samples:
            whole = n % self.shard_samples // self.inner_samples
            record["partial"] = {
                "whole_chunks": whole,
                "prefix_crc32c": [table_crc(raw, whole) for raw in indexes[-1]],
                **self._partial_rows(n),
            }
        return record

    def _partial_rows(self, n: int) -> dict:
        """The committed rows of the last, partly filled inner chunk (if any) and, per layer, the CRC-32C of
        their values: what binds that chunk, whose stored bytes change at the next commit."""
        rows = n % self.inner_samples
        if not rows:
            return {}
        values = self.read(list(range(self.array.shape[0])), n - rows, n)
        return {"rows": rows, "rows_crc32c": [span_crc(layer.tobytes()) for layer in values]}

    def _stored_index(self, layer: int, shard: int) -> bytes:
        """A shard's index bytes as stored (for the record: the writer just wrote and checked them)."""
        index_bytes = 16 * (self.shard_samples // self.inner_samples) + CRC_BYTES
        with self.location.shard(self._path(layer, shard)) as stored:
            raw = stored.tail(index_bytes)
        if raw is None or len(raw) != index_bytes:
            raise self._corrupt(
                f"layer {layer}",
                shard * self.shard_samples,
                (shard + 1) * self.shard_samples,
                "shard: missing or cut short right after its commit",
                self._path(layer, shard),
            )
        return raw

    def _layout_key(self) -> int:
        """Which chunking and codecs the shard files were written with (a CRC of their metadata)."""
        meta = self.array.metadata.to_dict()
        return zlib.crc32(json.dumps([meta["chunk_grid"], meta["codecs"]], sort_keys=True).encode())

    def _read_through_zarr(self, layers: list[int], start: int, stop: int) -> np.ndarray:
        try:
            return self.array.get_orthogonal_selection((layers, slice(start, stop), slice(None)))
        except (ValueError, RuntimeError) as exc:  # how zarr's crc32c codec and Blosc report bad bytes
            raise self._corrupt(_layers_text(layers), start, stop, str(exc)) from exc

    def _read_shard(self, layer: int, shard: int, out: np.ndarray, start: int, stop: int) -> None:
        """Fill ``out`` (samples start:stop) from one shard, decoding only the inner chunks needed."""
        for c_lo, c_hi, c_first, frame in self._chunks_of(layer, shard, start, stop):
            out[c_lo - start : c_hi - start] = self._decode(layer, c_first, frame, c_lo, c_hi)

    def _chunks_of(
        self, layer: int, shard: int, start: int, stop: int
    ) -> list[tuple[int, int, int, memoryview | None]]:
        """(lo, hi, chunk's first sample, verified Blosc frame or None) for each inner chunk of ``shard`` in
        start:stop.

        """
        first = shard * self.shard_samples
        lo, hi = max(start, first), min(stop, first + self.shard_samples)
        chunks = range((lo - first) // self.inner_samples, -(-(hi - first) // self.inner_samples))
        frames = self._fetch_chunks(layer, shard, chunks.start, chunks.stop)
        pieces = []
        for chunk in chunks:
            c_first = first + chunk * self.inner_samples
            pieces.append((max(lo, c_first), min(hi, c_first + self.inner_samples), c_first, frames.get(chunk)))
        return pieces

    def _decode(self, layer: int, c_first: int, frame: memoryview | None, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of the inner chunk starting at sample ``c_first``."""
        if frame is None:  # never written: the fill value
            return np.full((hi - lo, self.hidden), np.nan, dtype=self.dtype)
        try:
            decoded = numcodecs.blosc.decompress(frame)
        except RuntimeError as exc:  # Blosc's report of a frame it cannot decode
            raise self._corrupt(f"layer {layer}", c_first, c_first + self.inner_samples, str(exc)) from exc
        return np.frombuffer(decoded, dtype=self.dtype).reshape(-1, self.hidden)[lo - c_first : hi - c_first]

    def _fetch_chunks(self, layer: int, shard: int, first: int, stop: int) -> dict[int, memoryview]:
        """The verified Blosc frames of a shard's inner chunks first..stop-1 (those present), in one read.

        A file's index is cached per version of the file, and index and chunks come through one descriptor.
        A bucket's index is cached for the life of this reader (a snapshot as of one commit) without asking
        for the object's version, which would cost a request per read: committed chunks keep their offsets
        in later versions of a shard, but the last, partly filled chunk moves when a writer adds to it. So
        bytes that fail their checks under such a cached index are read again with a fresh index before
        they count as corrupt.
        """
        try:
            return self._read_chunks(layer, shard, first, stop, fresh=False)
        except _StaleIndex:
            return self._read_chunks(layer, shard, first, stop, fresh=True)

    def _read_chunks(self, layer: int, shard: int, first: int, stop: int, fresh: bool) -> dict[int, memoryview]:
        path = self._path(layer, shard)
        with self.location.shard(path) as stored:
            index, unverified = self._index(stored, path, layer, shard, fresh)
            if index is None:
                return {}
            offsets, sizes = index.offsets[first:stop], index.sizes[first:stop]
            present = [i for i, offset in enumerate(offsets) if offset != MISSING]
            if not present:
                return {}
            begin = min(offsets[i] for i in present)
            span = max(offsets[i] + sizes[i] for i in present) - begin
            raw = stored.range(begin, span)
        first_sample = shard * self.shard_samples
        if len(raw) != span:  # files: replaced by renaming, never truncated; objects: replaced whole
            if unverified:
                raise _StaleIndex
            raise self._corrupt(
                f"layer {layer}", first_sample, first_sample + self.shard_samples, "shard: cut short while read", path
            )
        spans = [(offsets[i] - begin, sizes[i]) for i in present]
        # A whole shard (what a layer's read takes of it) is verified in one pass over its bytes, which runs
        # without the GIL, against their CRC when each chunk last passed its own; the first time, and for any
        # other read, chunk by chunk (a call each, holding the GIL: most of what verifying a layer cost).
        whole = span_crc(raw) if self.chunk_crc and len(present) == index.written and len(present) > 1 else None
        try:
            frames = chunk_frames(
                raw,
                spans,
                self.chunk_crc,
                self.chunk_bytes,
                crcs_checked=whole is not None and index.passed.get((first, stop)) == whole,
            )
        except ChunkMismatch as exc:
            if unverified:
                raise _StaleIndex from None
            c_first = first_sample + (first + present[exc.position]) * self.inner_samples
            raise self._corrupt(
                f"layer {layer}", c_first, c_first + self.inner_samples, f"inner chunk: {exc}", path
            ) from None
        if whole is not None:
            index.passed[first, stop] = whole
        chunks = {first + i: frame for i, frame in zip(present, frames)}
        if shard == len(self._committed) - 1 and self._partial is not None:
            self._check_partial_rows(layer, shard, chunks, first, stop, unverified, path)
        return chunks

    def _check_partial_rows(
        self, layer: int, shard: int, chunks: dict[int, memoryview], first: int, stop: int, unverified: bool, path: str
    ) -> None:
        """The chunk partly filled at the commit served must begin with the rows recorded then (``record``):
        its stored bytes change at every commit, and its index entry alone (one size) binds it weakly."""
        partial = self._partial
        position = partial["whole_chunks"]
        if not partial.get("rows") or not first <= position < stop:
            return
        frame = chunks.get(position)
        try:
            rows_bytes = partial["rows"] * self.hidden * self.dtype.itemsize
            values = b"" if frame is None else numcodecs.blosc.decompress(frame)[:rows_bytes]
        except RuntimeError:
            values = b""
        if span_crc(values) == partial["rows_crc32c"][layer]:
            return
        if unverified:
            raise _StaleIndex
        c_first = shard * self.shard_samples + position * self.inner_samples
        raise self._corrupt(
            f"layer {layer}",
            c_first,
            c_first + partial["rows"],
            "shard: not the shard committed "
            "here (its partly filled chunk holds other values than at commit: a file from another "
            "layer or run?)",
            path,
        )

    def _index(self, stored: ShardBytes, path: str, layer: int, shard: int, fresh: bool) -> tuple[Index | None, bool]:
        """The shard's verified chunk index (at its end), or None when the shard does not exist; and whether it
        came from the cache without a version to check it against (see ``_fetch_chunks``)."""
        cached = self._indexes.get(path)
        if not fresh and cached is not None and cached[0] == stored.version:
            return cached[1], stored.version is None
        n = self.shard_samples // self.inner_samples
        index_bytes = 16 * n + CRC_BYTES
        raw = stored.tail(index_bytes)
        if raw is None:
            return None, False
        try:
            if stored.size is not None and stored.size < index_bytes:
                raise Mismatch(f"file of {stored.size} bytes, shorter than its {index_bytes}-byte index")
            index = parse_index(raw, n, None if stored.size is None else stored.size - index_bytes)
            self._check_recorded(raw, layer, shard)
        except Mismatch as exc:
            first = shard * self.shard_samples
            raise self._corrupt(f"layer {layer}", first, first + self.shard_samples, f"shard: {exc}", path) from None
        self._indexes[path] = (stored.version, index)
        return index, False

    def _check_recorded(self, raw: bytes, layer: int, shard: int) -> None:
        """Mismatch unless the index ``raw`` (its CRC verified) is the one recorded for (layer, shard) at the
        commit served, or, for the shard partly filled then, a later version of it: one whose whole chunks of
        that commit keep their entries (a writer has appended since, or was killed amid a commit; see
        ``record``); the rows of its chunk partly filled then are checked when read (``_check_partial_rows``).
        Shards past the record (runs written before records covered every shard) are not checked."""
        if shard >= len(self._committed) or int.from_bytes(raw[-CRC_BYTES:], "little") == self._committed[shard][layer]:
            return
        partial = self._partial
        if (
            partial is not None
            and shard == len(self._committed) - 1
            and table_crc(raw, partial["whole_chunks"]) == partial["prefix_crc32c"][layer]
        ):
            return
        raise Mismatch(
            "not the shard committed here (its index differs from the one recorded at commit: "
            "a file from another layer or run?)"
        )

    def _path(self, layer: int, shard: int) -> str:
        return f"{self._chunk_keys}/{layer}/{shard}/0"

    def _corrupt(self, layers: str, start: int, stop: int, why: str, path: str | None = None) -> CorruptData:
        """The error for stored bytes that fail verification; logged with the file, for the operator."""
        stop = min(stop, self.array.shape[1])
        where = f" (file {path.removeprefix(self.run_name + '/')} of store {self.location})" if path else ""
        message = (
            f"corrupt data in run {self.run_name}, {layers}, samples {start}:{stop}{where}: {why}; "
            "restore the run's files from a backup or ingest it again"
        )
        log.error("%s", message)
        return CorruptData(message)
