"""Direct writes of sharded hidden states: what ``RunWriter.commit`` writes states with.

zarr-python encodes a shard's inner chunks one by one through its async codec pipeline and writes the
states of a capture at ~60 MB/s here, slower than the forward pass that produces them. This writer produces
the same shard files directly, for exactly the layout StateReader reads directly (reader.py: one layer and
the whole width per shard, inner chunks of Blosc frames, each with its CRC-32C where the array's codecs say
so, the index of (offset, size) pairs at the end with its CRC-32C, "/" in chunk keys); arrays of any other
layout are written through zarr-python.

What zarr-python would write, chunk for chunk, as the Zarr v3 sharding spec has it: chunks in order,
back to back from offset 0, then the index, little-endian uint64 (offset, nbytes) per inner chunk (2**64-1
twice for a chunk never written), then the index's CRC-32C; every stored chunk whole (an edge chunk's rows
past the data hold the array's fill value), Blosc-encoded with the parameters the array's metadata gives,
then suffixed with its CRC-32C (little-endian, as zarr's ``crc32c`` codec). Rows ``start:stop`` are written
past the committed end: in the shard holding ``start``, the inner chunks wholly before it (committed) keep
their stored bytes, so their offsets, and their index entries, stay what they were (what plain readers and
the shard record rely on); the chunk partly filled at ``start`` is decoded, verified, merged with the new
rows and encoded again; chunks past ``stop`` stay missing (any that an interrupted writer left are dropped).
Unlike zarr-python, a chunk holding only the fill value is stored too (zarr drops it), which reads the same.

Each shard file is replaced whole through the location's zarr store (``store.set``): a folder's LocalStore
writes a temporary file and renames it into place, a bucket PUTs the object, so a crash or a full disk
never damages a committed sample (``Location.discard_partial_writes`` removes the temporary files left).
Chunks are encoded in a thread pool (Blosc releases the GIL), and the shards of a commit are written
concurrently from another, so that a bucket's uploads overlap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, wait

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from actstore.pools import ForkSafePool, cores
from actstore.store.blosc_split import split_byte_streams
from actstore.store.checksum import CRC_BYTES, Mismatch, chunk_frames, span_crc
from actstore.store.errors import CorruptData
from actstore.store.location import Location, join
from actstore.store.shard_format import CHECKSUMMED, MISSING, PLAIN, inner_codecs, parse_index

_ENCODE = ForkSafePool(max_workers=max(2, cores()), thread_name_prefix="actstore-encode")
_PUT = ForkSafePool(max_workers=16, thread_name_prefix="actstore-put")  # a bucket's uploads overlap
_IN_FLIGHT = 32  # shards encoded or being written at once: bounds what a large commit holds encoded
_SHUFFLES = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE}
_SHUFFLES["bitshuffle"] = numcodecs.Blosc.BITSHUFFLE


class ShardWriter:
    """Writes rows of a (layer, row, hidden) array of states sharded as StateReader reads directly; ``of``
    says whether an array is one."""

    def __init__(self, array: zarr.Array, location: Location, key: str) -> None:
        """``key``: the array's key in ``location``; ``array``: with the metadata the rows are written under
        (its shape, past the committed end, is not consulted)."""
        self.location, self.key = location, key
        self.run_name = key.rpartition("/")[0] or key
        sharding = array.metadata.codecs[0]
        self.inner_samples, self.shard_samples = array.chunks[1], array.shards[1]
        self.n_layers, self.hidden = array.shape[0], array.shape[2]
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill = np.array(array.metadata.fill_value, dtype=self.dtype)
        self.chunk_crc = inner_codecs(array) == CHECKSUMMED
        self.chunk_bytes = self.inner_samples * self.hidden * self.dtype.itemsize
        self.n_chunks = self.shard_samples // self.inner_samples
        self.index_bytes = 16 * self.n_chunks + CRC_BYTES
        self.blosc = _blosc(next(c for c in sharding.codecs if isinstance(c, BloscCodec)), self.dtype.itemsize)

    @classmethod
    def of(cls, array: zarr.Array, location: Location, key: str) -> ShardWriter | None:
        """The direct writer of ``array``, or None where zarr-python must write it (another layout)."""
        inner = inner_codecs(array)
        if inner not in (PLAIN, CHECKSUMMED) or array.ndim != 3:
            return None
        sharding = array.metadata.codecs[0]
        shape = array.shape
        if (
            array.chunks != (1, array.chunks[1], shape[2])
            or array.shards != (1, array.shards[1], shape[2])
            or array.shards[1] % array.chunks[1]
            or np.dtype(array.dtype).kind != "f"
            or not isinstance(sharding.codecs[0], BytesCodec)
            or (sharding.codecs[0].endian is not None and sharding.codecs[0].endian.value != "little")
            or (inner == CHECKSUMMED and not isinstance(sharding.codecs[2], Crc32cCodec))
        ):
            return None
        return cls(array, location, key)

    def write(self, values: np.ndarray | Sequence[np.ndarray], start: int, stop: int) -> None:
        """Store ``values`` (layer, stop - start, hidden), or consecutive blocks of them (layer, rows, hidden)
        as a writer buffered them, as rows ``start:stop`` of every layer: each shard they touch written whole,
        the committed chunks before ``start`` kept (see the module docstring). Blocks are not joined first
        (a copy of everything, ~1 s per 500 MB here): each chunk takes its rows from the block holding them.
        Returns once every shard is in place; raises the first failure (OSError for a full disk) once every
        write begun has ended, so that nothing of this call lands later."""
        rows = _Blocks([values] if isinstance(values, np.ndarray) else list(values), self.dtype)
        if rows.shape != (self.n_layers, stop - start, self.hidden):
            raise ValueError(f"rows {start}:{stop} of {self.key}: values of shape {rows.shape}")
        if stop <= start:
            return
        layers = range(self.n_layers)
        shards = range(start // self.shard_samples, -(-stop // self.shard_samples))
        first = shards.start
        # what the first shard keeps: read before any encoding, all layers at once
        kept = {}
        if start % self.shard_samples:
            kept = dict(zip(layers, _PUT.map(lambda layer: self._committed(layer, first, start), layers)))
        store = self.location.zarr_store()
        jobs: deque[tuple[Future[bytes], Future[None]]] = deque()  # (encoding, writing) of each shard in flight
        try:
            for layer in layers:
                for shard in shards:
                    encoded = _ENCODE.submit(self._encode_shard, rows, layer, start, stop, shard, kept.get(layer))
                    jobs.append((encoded, _PUT.submit(_put, store, self._path(layer, shard), encoded)))
                    if len(jobs) >= _IN_FLIGHT:
                        jobs[0][1].result()
                        jobs.popleft()
            while jobs:
                jobs[0][1].result()
                jobs.popleft()
        finally:  # after a failure or an interrupt: drop what has not begun, wait for what has
            for encoding, writing in jobs:
                writing.cancel()
                encoding.cancel()
            wait([writing for _, writing in jobs])

    def _committed(self, layer: int, shard: int, start: int) -> tuple[list[memoryview | None], np.ndarray | None]:
        """What the shard holding ``start`` keeps of its stored version: the stored bytes of each inner chunk
        wholly before ``start`` (None where never written), and the decoded rows before ``start`` of the chunk
        partly filled there (None where there is none, or where it was never written: the fill value)."""
        first = shard * self.shard_samples
        whole, rows = divmod(start - first, self.inner_samples)
        path = self._path(layer, shard)
        wanted = whole + (1 if rows else 0)
        with self.location.shard(path) as stored:
            raw = stored.tail(self.index_bytes)
            if raw is None:
                return [None] * whole, None
            try:
                if stored.size is not None and stored.size < self.index_bytes:
                    raise Mismatch(f"file of {stored.size} bytes, shorter than its {self.index_bytes}-byte index")
                data_end = None if stored.size is None else stored.size - self.index_bytes
                index = parse_index(raw, self.n_chunks, data_end)
            except Mismatch as exc:
                raise self._corrupt(layer, first, first + self.shard_samples, f"shard: {exc}", path) from None
            offsets, sizes = index.offsets[:wanted], index.sizes[:wanted]
            present = [i for i, offset in enumerate(offsets) if offset != MISSING]
            if not present:
                return [None] * whole, None
            begin = min(offsets[i] for i in present)
            span = max(offsets[i] + sizes[i] for i in present) - begin
            data = stored.range(begin, span)
        if len(data) != span:
            raise self._corrupt(layer, first, first + self.shard_samples, "shard: cut short while read", path)
        view = memoryview(data)  # the stored chunks are copied once, into the new shard
        chunks: list[memoryview | None] = [None] * wanted
        for i in present:
            chunks[i] = view[offsets[i] - begin : offsets[i] - begin + sizes[i]]
        if not rows or chunks[whole] is None:
            return chunks[:whole], None
        c_first = first + whole * self.inner_samples
        try:  # the partly filled chunk is decoded: its bytes must pass every check a reader makes
            (frame,) = chunk_frames(chunks[whole], [(0, len(chunks[whole]))], self.chunk_crc, self.chunk_bytes)
            decoded = numcodecs.blosc.decompress(frame)
        except (Mismatch, RuntimeError) as exc:
            why = f"inner chunk: {exc}"
            raise self._corrupt(layer, c_first, c_first + self.inner_samples, why, path) from None
        return chunks[:whole], np.frombuffer(decoded, dtype=self.dtype).reshape(-1, self.hidden)[:rows]

    def _encode_shard(
        self,
        values: _Blocks,
        layer: int,
        start: int,
        stop: int,
        shard: int,
        kept: tuple[list[memoryview | None], np.ndarray | None] | None,
    ) -> bytes:
        """The bytes of one shard file of ``layer``, ``values`` holding the rows start:stop."""
        first = shard * self.shard_samples
        lo, hi = max(start, first), min(stop, first + self.shard_samples)
        chunks: list[bytes | memoryview | None] = [None] * self.n_chunks
        kept_chunks, partial = kept if kept is not None else ([], None)
        chunks[: len(kept_chunks)] = kept_chunks
        for chunk in range((lo - first) // self.inner_samples, -(-(hi - first) // self.inner_samples)):
            c_first = first + chunk * self.inner_samples
            a, b = max(lo, c_first), min(hi, c_first + self.inner_samples)
            if b - a == self.inner_samples:
                block = values.rows(layer, a - start, b - start)
            else:  # an edge chunk, stored whole: the committed rows before, the fill value after
                block = np.full((self.inner_samples, self.hidden), self.fill, dtype=self.dtype)
                if partial is not None and c_first < start:
                    block[: len(partial)] = partial
                block[a - c_first : b - c_first] = values.rows(layer, a - start, b - start)
            frame = self.blosc.encode(block)
            chunks[chunk] = frame + span_crc(frame).to_bytes(CRC_BYTES, "little") if self.chunk_crc else frame
        table = np.full((self.n_chunks, 2), MISSING, dtype="<u8")
        offset = 0
        for chunk, stored in enumerate(chunks):
            if stored is not None:
                table[chunk] = offset, len(stored)
                offset += len(stored)
        index = table.tobytes()
        return b"".join([*(c for c in chunks if c is not None), index, span_crc(index).to_bytes(CRC_BYTES, "little")])

    def _path(self, layer: int, shard: int) -> str:
        return join(self.key, "c", str(layer), str(shard), "0")

    def _corrupt(self, layer: int, start: int, stop: int, why: str, path: str) -> CorruptData:
        """Committed bytes that a commit must rewrite fail their checks: reported as a reader would."""
        return CorruptData(
            f"corrupt data in run {self.run_name}, layer {layer}, samples {start}:{stop} (file "
            f"{path.removeprefix(self.run_name + '/')} of store {self.location}): {why}; restore the run's files "
            "from a backup or ingest it again"
        )


class _Blocks:
    """Consecutive blocks of rows (layer, rows, hidden), read as one array of their rows without joining them."""

    def __init__(self, blocks: list[np.ndarray], dtype: np.dtype) -> None:
        self.blocks = [np.asarray(block, dtype=dtype) for block in blocks]
        self.starts = np.cumsum([0, *(block.shape[1] for block in self.blocks)])
        first = self.blocks[0].shape if self.blocks else (0, 0, 0)
        self.shape = (first[0], int(self.starts[-1]), first[2])

    def rows(self, layer: int, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of ``layer``, contiguous: a copy of one chunk's rows, taken from one block or
        several."""
        i = int(np.searchsorted(self.starts, lo, side="right")) - 1
        if hi <= self.starts[i + 1]:
            return np.ascontiguousarray(self.blocks[i][layer, lo - self.starts[i] : hi - self.starts[i]])
        pieces = []
        while lo < hi:
            end = min(hi, int(self.starts[i + 1]))
            pieces.append(self.blocks[i][layer, lo - self.starts[i] : end - self.starts[i]])
            lo, i = end, i + 1
        return np.concatenate(pieces)


def _blosc(codec: BloscCodec, itemsize: int) -> numcodecs.Blosc:
    """numcodecs' Blosc with the parameters of the array's codec, as zarr-python encodes with it, its blocks
    split into byte streams (blosc_split.py)."""
    split_byte_streams()
    typesize = codec.typesize or itemsize
    shuffle = codec.shuffle.value if codec.shuffle is not None else ("shuffle" if typesize > 1 else "bitshuffle")
    return numcodecs.Blosc(
        cname=codec.cname.value,
        clevel=codec.clevel,
        shuffle=_SHUFFLES[shuffle],
        blocksize=codec.blocksize,
        typesize=typesize,
    )


def _put(store: zarr.abc.store.Store, key: str, encoded: Future[bytes]) -> None:
    """Replace the object ``key`` with a shard once encoded, as zarr-python replaces whole shards."""
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(encoded.result())))
