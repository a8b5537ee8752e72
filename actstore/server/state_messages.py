"""A ReadStates answer cut into messages of about READ_BYTES each, read lazily from one site of the run: raw
bytes in C order, or a sample range of whole rows as the stored Blosc chunks, undecoded. Whatever a stream is
suspended on holds one message and the chunks of one read, never the answer."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import zarr

from actstore.protocol import CHUNK_BYTES
from actstore.server.errors import Lossy
from actstore.store import Run
from actstore.v1 import actstore_pb2 as pb
from actstore.wire.states import blocks_message

READ_BYTES = CHUNK_BYTES // 2  # what a stream reads at a time: about one message, all a stalled stream holds

Message = tuple[bytes, int]  # a serialized ReadStatesResponse and the bytes of the answer it carries


@dataclass(frozen=True)
class Source:
    """What one answer reads: a site of the run (None: its first, a question run's only one) sent as ``dtype``."""

    run: Run
    site: str | None = None
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    @property
    def array(self) -> zarr.Array:
        return self.run.states(self.site or self.run.default_site)

    @property
    def width(self) -> int:
        return self.array.shape[2]

    @property
    def row_bytes(self) -> int:
        """A row's bytes as read or as sent, whichever is larger: what sizes a read."""
        return self.width * max(np.dtype(self.array.dtype).itemsize, self.dtype.itemsize)

    @property
    def inner_rows(self) -> int:
        return self.array.chunks[1]

    def encoded(self, layer: int, start: int, stop: int) -> Iterator[tuple[int, int, bytes | np.ndarray]]:
        """``Run.encoded_states`` of this site."""
        if self.site is None:
            yield from self.run.encoded_states(layer, start, stop)
            return
        reader = self.run.reader_of(self.site)
        if not reader.direct:
            yield start, stop - start, reader.read([layer], start, stop)[0]
            return
        yield from reader.encoded(layer, start, stop)


def next_message(messages: Iterator[Message], header: bytes) -> Message | None:
    """The next message with ``header`` (a serialized response holding the header) in front: serialized
    protobuf messages concatenated parse as one message holding the fields of both."""
    item = next(messages, None)
    return item if item is None or not header else (header + item[0], item[1])


def raw_messages(
    source: Source, layers: list[int], positions: np.ndarray, cols: slice, allow_lossy: bool
) -> Iterator[Message]:
    """The answer in C order as raw bytes, one message per read of at most READ_BYTES (see ``_reads``):
    nothing but the message outlives the statement that builds it, so that is all a suspended stream holds."""
    offset = 0
    for group, lo, hi in _reads(source, layers, positions):
        message, nbytes = _chunk_message(offset, _block(source, group, positions[lo:hi], cols, allow_lossy))
        yield message, nbytes
        offset += nbytes


def _chunk_message(offset: int, block: np.ndarray) -> Message:
    return pb.ReadStatesResponse(
        chunk=pb.StatesChunk(offset=offset, data=block.tobytes())
    ).SerializeToString(), block.nbytes


def stored_chunks(source: Source, layers: list[int], first: int, n: int) -> Iterator[Message]:
    """A sample range of whole rows of states, in their stored dtype, as the stored Blosc chunks, undecoded: runs of
    consecutive chunks travel as one EncodedBlock, about READ_BYTES of them per message; its blocks are let
    go before it is yielded, so a suspended stream holds the message and the chunks of one read
    (``_encoded``)."""
    row_bytes = source.width * source.dtype.itemsize
    blocks: list[tuple[int, int, int, list[bytes]]] = []
    wire = carried = 0
    for index, layer in enumerate(layers):
        pieces: list[bytes] = []
        run_start = run_count = 0
        for start, count, payload in _encoded(source, layer, first, first + n):
            if isinstance(payload, bytes):
                if not pieces:
                    run_start, run_count = start - first, 0
                pieces.append(payload)
                run_count += count
                wire, carried = wire + len(payload), carried + count * row_bytes
            else:  # a partial chunk at either end of the range, decoded
                yield _chunk_message((index * n + start - first) * row_bytes, payload)
            if pieces and (wire >= READ_BYTES or not isinstance(payload, bytes)):
                blocks.append((index, run_start, run_count, pieces))
                pieces = []
            if wire >= READ_BYTES:
                message, blocks = blocks_message(blocks), []
                yield message, carried
                wire, carried = 0, 0
        if pieces:
            blocks.append((index, run_start, run_count, pieces))
    if blocks:
        yield blocks_message(blocks), carried


def _encoded(source: Source, layer: int, start: int, stop: int) -> Iterator[tuple[int, int, bytes | np.ndarray]]:
    """``Source.encoded`` read a message's worth of samples at a time (not a shard), each read taken whole
    (the reader then lets its fetched bytes go) and handed on piece by piece, so that a stream holds little
    more than the message it is sending."""
    for lo, hi in _spans(start, stop, _rows_per_read(source)):
        pieces = collections.deque(source.encoded(layer, lo, hi))
        while pieces:
            yield pieces.popleft()


def _rows_per_read(source: Source) -> int:
    """Samples of one layer in READ_BYTES, whole stored chunks of them (a chunk is decoded once)."""
    inner = source.inner_rows
    return max(inner, READ_BYTES // source.row_bytes // inner * inner)


def _spans(start: int, stop: int, rows: int) -> Iterator[tuple[int, int]]:
    """start:stop cut at the multiples of ``rows``, which are stored chunk boundaries."""
    lo = start
    while lo < stop:
        hi = min(stop, (lo // rows + 1) * rows)
        yield lo, hi
        lo = hi


def is_range(positions: np.ndarray) -> bool:
    first = int(positions[0])
    return bool(np.array_equal(positions, np.arange(first, first + len(positions))))


def _reads(source: Source, layers: list[int], positions: np.ndarray) -> Iterator[tuple[list[int], int, int]]:
    """(layers, lo, hi): the reads of ``positions[lo:hi]`` making up the answer, in C order, each at most
    READ_BYTES of whole rows. A selection that small is one read of all layers (one sample across every
    layer is the latency-critical case); larger ones go layer by layer, in runs of samples cut at stored
    chunk boundaries, so that no chunk is decoded twice."""
    if len(layers) * len(positions) * source.row_bytes <= READ_BYTES:
        yield layers, 0, len(positions)
        return
    spans = list(_position_spans(positions, _rows_per_read(source)))
    for layer in layers:
        for lo, hi in spans:
            yield [layer], lo, hi


def _position_spans(positions: np.ndarray, rows: int) -> Iterator[tuple[int, int]]:
    """Index spans of ``positions``, ``rows`` each; for a range, cut where the samples cross a multiple of
    ``rows`` (a chunk boundary)."""
    if is_range(positions):
        first = int(positions[0])
        for lo, hi in _spans(first, first + len(positions), rows):
            yield lo - first, hi - first
        return
    for lo in range(0, len(positions), rows):
        yield lo, min(lo + rows, len(positions))


def _block(source: Source, layers: list[int], positions: np.ndarray, cols: slice, allow_lossy: bool) -> np.ndarray:
    """One read, sliced and converted, C-contiguous; Lossy where float16 would change a value not allowed to
    (float16 states widened to float32 change none)."""
    block, dtype = _read(source, layers, positions)[:, :, cols], source.dtype
    if dtype != block.dtype:
        converted = block.astype(dtype)
        narrower = dtype.itemsize < block.dtype.itemsize
        if narrower and not allow_lossy and not np.array_equal(converted.astype(block.dtype), block):
            raise Lossy(
                f"float16 would change values in layers {layers[0]}..{layers[-1]}; ask for float32, or allow lossy"
            )
        block = converted
    return np.ascontiguousarray(block)


def _read(source: Source, layers: list[int], positions: np.ndarray) -> np.ndarray:
    run, site = source.run, source.site
    if is_range(positions):  # no gather needed
        return run.read_states(layers, int(positions[0]), int(positions[0]) + len(positions), site)
    return run.read_rows(layers, positions, site)
