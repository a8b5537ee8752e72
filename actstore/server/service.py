"""The gRPC services: a catalog of runs and streamed reads, each call authorised against run access."""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor

import grpc
import numpy as np

from actstore.protocol import (CHUNK_BYTES, DTYPE_ENUMS, DTYPE_NAMES, MAX_MESSAGE_BYTES, VISIBILITY_ENUMS,
                               VISIBILITY_NAMES)
from actstore.server import selection
from actstore.server.auth import Caller
from actstore.server.errors import Forbidden, Lossy, TooLarge, status_of
from actstore.server.gate import Stalled, StreamBudget, caller_key, log_call
from actstore.store import Run, RunNotFound, Store
from actstore.store.errors import DamagedRun
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc
from actstore.wire.states import encode_block

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_DETAILS_CHARS = 1000  # status details travel in HTTP/2 trailers, which peers cap at a few KiB
MAX_LABEL_BYTES = MAX_MESSAGE_BYTES * 3 // 4  # labels travel in one message (ReadLabels, the states' header)
LABEL_ROW_BYTES = 20  # protobuf framing of one sample's labels, beyond its strings: tags, lengths, id, flag
READ_BYTES = CHUNK_BYTES // 2  # what a stream reads at a time: about one message, all a stalled stream holds
MESSAGE_SLACK = 128 << 10  # a message's bytes beyond READ_BYTES: one stored chunk past the size, framing


def rpc(method: Callable) -> Callable:
    """Map errors to precise statuses and log each call; the caller comes from the AuthGate interceptor.

    A plain function is blocking work (the store, numpy): it runs on the server's bounded executor, so the
    event loop stays free for every other call. A coroutine is a stream: it runs on the event loop and
    awaits each write, so a client that stops reading holds no thread; it counts against its caller's
    stream budget while it runs.
    """
    name = method.__name__
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def streaming(self, request, context: grpc.aio.ServicerContext, caller: Caller) -> None:
            started = time.perf_counter()
            try:
                with self.streams.hold(caller_key(caller, context.peer())):
                    await method(self, request, context, caller)
            except asyncio.CancelledError:
                log_call(name, caller, grpc.StatusCode.CANCELLED, started)
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                await _fail(context, name, started, caller, exc)
            log_call(name, caller, grpc.StatusCode.OK, started)

        return streaming

    @functools.wraps(method)
    async def unary(self, request, context: grpc.aio.ServicerContext, caller: Caller):
        started = time.perf_counter()
        try:
            response = await self.offload(method, self, request, caller)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await _fail(context, name, started, caller, exc)
        log_call(name, caller, grpc.StatusCode.OK, started)
        return response

    return unary


async def _fail(context: grpc.aio.ServicerContext, name: str, started: float, caller: Caller,
                exc: Exception) -> None:
    code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(exc, Stalled) else status_of(exc)
    log_call(name, caller, code, started)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error in %s", name, exc_info=exc)
    details = str(exc) if code is not grpc.StatusCode.INTERNAL else "internal server error"
    await context.abort(code, details if len(details) <= MAX_DETAILS_CHARS else details[:MAX_DETAILS_CHARS] + "...")


class _Base:
    def __init__(self, store: Store, max_response_bytes: int, pool: Executor, streams: StreamBudget) -> None:
        self.store = store
        self.max_response_bytes = max_response_bytes
        self.pool = pool
        self.streams = streams

    async def offload(self, fn: Callable, *args):
        """``fn(*args)`` on the bounded executor: blocking work never stalls the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def readable_run(self, ref: pb.RunRef, caller: Caller) -> Run:
        """The run, or NOT_FOUND worded alike whether it is absent or hidden from this caller (AIP-211):
        a different answer would tell outsiders which private runs exist."""
        absent = RunNotFound(f"no run {ref.model}/{ref.method}")  # not the store's message: it lists every run
        try:
            run = self.store.run(ref.model, ref.method)
        except RunNotFound:
            raise absent from None
        except DamagedRun as damaged:  # DATA_LOSS only to callers who could read it; unknown access: open servers
            if not (caller.can_read(damaged.access) if damaged.access is not None else caller.is_open):
                raise absent from None
            raise
        if not caller.can_read(run.access):
            raise absent
        return run

    def check_size(self, what: str, states_bytes: int, n_samples: int, label_bytes: Callable[[], int]) -> None:
        """Refuse, before any of it is read, an answer above the response cap or labels above one message.

        ``label_bytes`` is called only when the framing alone fits: a huge selection is refused in O(1).
        """
        split = "ask for fewer layers or samples (e.g. consecutive sample ranges, one request each)"
        if n_samples * LABEL_ROW_BYTES > MAX_LABEL_BYTES or states_bytes > self.max_response_bytes:
            labels = n_samples * LABEL_ROW_BYTES
        else:
            labels = label_bytes()
        if labels > MAX_LABEL_BYTES:
            raise TooLarge(f"the labels of {n_samples:,} samples take {labels / 2**20:.1f} MiB or more, above the "
                           f"{MAX_LABEL_BYTES / 2**20:.0f} MiB one message carries: {split}")
        size = states_bytes + labels
        if size > self.max_response_bytes:
            raise TooLarge(f"the {what} is {size / 2**20:.1f} MiB, above this server's cap of "
                           f"{self.max_response_bytes / 2**20:.3g} MiB per request: {split}")


def summary(run: Run) -> pb.RunSummary:
    n_layers, n_samples, hidden = run.shape
    access = run.access
    return pb.RunSummary(
        run=pb.RunRef(model=run.model, method=run.method), n_layers=n_layers, n_samples=n_samples, hidden=hidden,
        accuracy=run.accuracy, complete=run.complete,
        access=pb.Access(owner_group=access["owner_group"] or "", visibility=VISIBILITY_ENUMS[access["visibility"]],
                         shared_with=access["shared_with"]),
    )


def _label_bytes(run: Run, positions: np.ndarray) -> int:
    """The labels of these samples on the wire (within a few bytes a sample)."""
    labels = run.labels()
    text = sum(sum(map(len, labels[name][positions])) for name in ("subject", "answer", "prediction"))
    return text + len(positions) * LABEL_ROW_BYTES


def _labels(run: Run, positions: np.ndarray) -> pb.Labels:
    labels = run.labels()
    return pb.Labels(
        sample=labels["sample"][positions].tolist(),
        subject=labels["subject"][positions].tolist(),
        answer=labels["answer"][positions].tolist(),
        prediction=labels["prediction"][positions].tolist(),
        correct=labels["correct"][positions].tolist(),
    )


class CatalogService(_Base, pb_grpc.CatalogServiceServicer):
    @rpc
    def ListRuns(self, request: pb.ListRunsRequest, caller: Caller) -> pb.ListRunsResponse:
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise selection.BadRequest(f"page_size must be within 0..{MAX_PAGE_SIZE}")
        size = request.page_size or DEFAULT_PAGE_SIZE
        runs = [
            r for r in self.store.runs()
            if (not request.model or r.model == request.model) and (not request.method or r.method == request.method)
            and caller.can_read(r.access)
        ]
        start = _page_start(request.page_token, runs)
        page = runs[start : start + size]
        more = start + size < len(runs)
        return pb.ListRunsResponse(runs=[summary(r) for r in page],
                                   next_page_token=f"{page[-1].model}/{page[-1].method}" if more else "")

    @rpc
    def DescribeRun(self, request: pb.DescribeRunRequest, caller: Caller) -> pb.RunInfo:
        run = self.readable_run(request.run, caller)
        return describe(run)

    @rpc
    def SetVisibility(self, request: pb.SetVisibilityRequest, caller: Caller) -> pb.RunInfo:
        run = self.readable_run(request.run, caller)
        if not caller.owns(run.access):
            raise Forbidden(f"only the owner group {run.access['owner_group']!r} may change who reads this run")
        if request.visibility not in VISIBILITY_NAMES:
            raise selection.BadRequest("visibility must be private, shared or public")
        run = self.store.set_access(run.model, run.method, {
            "visibility": VISIBILITY_NAMES[request.visibility], "shared_with": list(request.shared_with)})
        log.info("run %s/%s is now %s", run.model, run.method, run.access["visibility"])
        return describe(run)


def _page_start(token: str, runs: list[Run]) -> int:
    """Page tokens name the last run of the previous page, so pages stay stable as runs are added."""
    if not token:
        return 0
    keys = [f"{r.model}/{r.method}" for r in runs]
    if "/" not in token:
        raise selection.BadRequest("malformed page_token")
    return next((i for i, key in enumerate(keys) if key > token), len(keys))


def describe(run: Run) -> pb.RunInfo:
    labels = run.labels()
    attrs = run.attrs
    return pb.RunInfo(
        summary=summary(run), dtype=str(run.hidden_states.dtype), layers=list(range(run.shape[0])),
        labels=[pb.LabelValues(name=name, values=sorted({str(v) for v in labels[name]}))
                for name in selection.LABEL_NAMES],
        size_bytes=run.size_bytes(), recipe_json=json.dumps(attrs.get("recipe", {})),
        attributes_json=json.dumps(attrs, default=str),
    )


class DataService(_Base, pb_grpc.DataServiceServicer):
    @rpc
    def ReadLabels(self, request: pb.ReadLabelsRequest, caller: Caller) -> pb.ReadLabelsResponse:
        wanted = selection.sample_ids(request.samples)
        run = self.readable_run(request.run, caller)
        positions = selection.positions(request.samples, wanted, run.labels(), run.sample_order)
        self.check_size("labels' answer", 0, len(positions), lambda: _label_bytes(run, positions))
        return pb.ReadLabelsResponse(labels=_labels(run, positions), run_complete=run.complete)

    @rpc
    async def ReadStates(self, request: pb.ReadStatesRequest, context: grpc.aio.ServicerContext,
                         caller: Caller) -> None:
        """One message at a time: reserved from the server's byte budget, read on the executor, written with
        flow control. gRPC takes a message only as the client's window opens, so a client that stops reading
        suspends this coroutine holding one message, and is ended after the idle period; a cancelled or
        expired call stops the reads. Messages are serialized on the executor, and the AuthGate passes the
        bytes on as they are."""
        sent, size = 0, 0
        try:
            first, messages, size = await self.offload(self._plan_read, request, caller)
            while (nbytes := await self._send_next(context, messages, first, size - sent)) is not None:
                sent, first = sent + nbytes, b""
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed (planning included)
            log.info("ReadStates cancelled by the client after %d of %d bytes; stopped reading", sent, size)
            raise

    async def _send_next(self, context: grpc.aio.ServicerContext, messages: Iterator[Message], header: bytes,
                         left: int) -> int | None:
        """Read and write the next message (``header`` in front) within a reservation of its size; the
        bytes of the answer it carried, or None at the end. Between two messages the stream holds none."""
        async with self.streams.reserve(min(max(left, 0), READ_BYTES) + MESSAGE_SLACK + len(header)):
            item = await self.offload(_next_message, messages, header)
            if item is None:
                return None
            await self._write(context, item[0])
            return item[1]

    async def _write(self, context: grpc.aio.ServicerContext, message: bytes) -> None:
        """Write, or Stalled when the client takes none of the message for the idle period. gRPC fails a
        write only on a call already over (cancelled, or past its deadline, sometimes before it cancels
        this task): that is a cancelled call, not an internal error."""
        try:
            async with asyncio.timeout(self.streams.idle_s) as idle:
                await context.write(message)
        except TimeoutError:
            raise Stalled(self._stalled()) from None
        except Exception as exc:  # noqa: BLE001 - gRPC's failed batch, whatever its class
            if idle.expired():
                raise Stalled(self._stalled()) from exc
            raise asyncio.CancelledError from exc

    def _stalled(self) -> str:
        return (f"the client read none of this stream for {self.streams.idle_s:g} s, this server's limit "
                "(actstore serve --stream-idle-timeout): read a stream as it arrives")

    def _plan_read(self, request: pb.ReadStatesRequest, caller: Caller) -> tuple[bytes, Iterator[Message], int]:
        """The header (a serialized response holding it), the messages to send (read lazily) and the answer's
        size; every check before any read."""
        wanted = selection.sample_ids(request.samples)
        if request.dtype not in DTYPE_NAMES:
            raise selection.BadRequest(f"unknown dtype {request.dtype}")
        run = self.readable_run(request.run, caller)
        n_layers, _, n_hidden = run.shape
        layers = selection.layers(request, n_layers)
        cols = selection.hidden(request, n_hidden)
        positions = selection.positions(request.samples, wanted, run.labels(), run.sample_order)
        dtype = np.dtype(DTYPE_NAMES[request.dtype])
        shape = (len(layers), len(positions), cols.stop - cols.start)
        size = int(np.prod(shape)) * dtype.itemsize
        self.check_size("selection", size, len(positions), lambda: _label_bytes(run, positions))
        header = pb.StatesHeader(
            shape=shape, dtype=DTYPE_ENUMS[dtype.name], dims=["layer", "sample", "hidden"], layers=layers,
            labels=_labels(run, positions), hidden_start=cols.start, run_complete=run.complete)
        whole_rows = dtype == np.float32 and cols == slice(0, n_hidden)
        if request.accept_blosc and whole_rows and size >= CHUNK_BYTES and _is_range(positions):
            messages = _stored_chunks(run, layers, int(positions[0]), len(positions))
        else:
            messages = _raw_messages(run, layers, positions, cols, dtype, request.allow_lossy)
        return pb.ReadStatesResponse(header=header).SerializeToString(), messages, size


Message = tuple[bytes, int]  # a serialized ReadStatesResponse and the bytes of the answer it carries


def _next_message(messages: Iterator[Message], header: bytes) -> Message | None:
    """The next message with ``header`` (a serialized response holding the header) in front: serialized
    protobuf messages concatenated parse as one message holding the fields of both."""
    item = next(messages, None)
    return item if item is None or not header else (header + item[0], item[1])


def _raw_messages(run: Run, layers: list[int], positions: np.ndarray, cols: slice, dtype: np.dtype,
                  allow_lossy: bool) -> Iterator[Message]:
    """The answer in C order as raw bytes, one message per read of at most READ_BYTES (see ``_reads``):
    nothing but the message outlives the statement that builds it, so that is all a suspended stream holds."""
    offset = 0
    for group, lo, hi in _reads(run, layers, positions):
        message, nbytes = _chunk_message(offset, _block(run, group, positions[lo:hi], cols, dtype, allow_lossy))
        yield message, nbytes
        offset += nbytes


def _chunk_message(offset: int, block: np.ndarray) -> Message:
    return pb.ReadStatesResponse(chunk=pb.StatesChunk(offset=offset, data=block.tobytes())).SerializeToString(), \
        block.nbytes


def _stored_chunks(run: Run, layers: list[int], first: int, n: int) -> Iterator[Message]:
    """A sample range of whole rows as the stored Blosc chunks, undecoded: runs of consecutive chunks
    travel as one EncodedBlock, about READ_BYTES of them per message; its blocks are let go before it is
    yielded, so a suspended stream holds the message and the chunks of one read (``_encoded``)."""
    row_bytes = run.shape[2] * 4
    blocks: list[pb.EncodedBlock] = []
    wire = carried = 0
    for index, layer in enumerate(layers):
        pieces: list[bytes] = []
        run_start = run_count = 0
        for start, count, payload in _encoded(run, layer, first, first + n):
            if isinstance(payload, bytes):
                if not pieces:
                    run_start, run_count = start - first, 0
                pieces.append(payload)
                run_count += count
                wire, carried = wire + len(payload), carried + count * row_bytes
            else:  # a partial chunk at either end of the range, decoded
                yield _chunk_message((index * n + start - first) * row_bytes, payload)
            if pieces and (wire >= READ_BYTES or not isinstance(payload, bytes)):
                blocks.append(encode_block(index, run_start, run_count, pieces))
                pieces = []
            if wire >= READ_BYTES:
                message, blocks = pb.ReadStatesResponse(blocks=blocks).SerializeToString(), []
                yield message, carried
                wire, carried = 0, 0
        if pieces:
            blocks.append(encode_block(index, run_start, run_count, pieces))
    if blocks:
        yield pb.ReadStatesResponse(blocks=blocks).SerializeToString(), carried


def _encoded(run: Run, layer: int, start: int, stop: int) -> Iterator[tuple[int, int, bytes | np.ndarray]]:
    """``run.encoded_states`` read a message's worth of samples at a time (not a shard), each read taken
    whole (the reader then lets its fetched bytes go) and handed on piece by piece, so that a stream holds
    little more than the message it is sending."""
    for lo, hi in _spans(start, stop, _rows_per_read(run)):
        pieces = collections.deque(run.encoded_states(layer, lo, hi))
        while pieces:
            yield pieces.popleft()


def _rows_per_read(run: Run) -> int:
    """Samples of one layer in READ_BYTES, whole stored chunks of them (a chunk is decoded once)."""
    inner = run.hidden_states.chunks[1]
    return max(inner, READ_BYTES // (run.shape[2] * 4) // inner * inner)


def _spans(start: int, stop: int, rows: int) -> Iterator[tuple[int, int]]:
    """start:stop cut at the multiples of ``rows``, which are stored chunk boundaries."""
    lo = start
    while lo < stop:
        hi = min(stop, (lo // rows + 1) * rows)
        yield lo, hi
        lo = hi


def _is_range(positions: np.ndarray) -> bool:
    first = int(positions[0])
    return bool(np.array_equal(positions, np.arange(first, first + len(positions))))


def _reads(run: Run, layers: list[int], positions: np.ndarray) -> Iterator[tuple[list[int], int, int]]:
    """(layers, lo, hi): the reads of ``positions[lo:hi]`` making up the answer, in C order, each at most
    READ_BYTES of whole rows. A selection that small is one read of all layers (one sample across every
    layer is the latency-critical case); larger ones go layer by layer, in runs of samples cut at stored
    chunk boundaries, so that no chunk is decoded twice."""
    if len(layers) * len(positions) * run.shape[2] * 4 <= READ_BYTES:
        yield layers, 0, len(positions)
        return
    spans = list(_position_spans(positions, _rows_per_read(run)))
    for layer in layers:
        for lo, hi in spans:
            yield [layer], lo, hi


def _position_spans(positions: np.ndarray, rows: int) -> Iterator[tuple[int, int]]:
    """Index spans of ``positions``, ``rows`` each; for a range, cut where the samples cross a multiple of
    ``rows`` (a chunk boundary)."""
    if _is_range(positions):
        first = int(positions[0])
        for lo, hi in _spans(first, first + len(positions), rows):
            yield lo - first, hi - first
        return
    for lo in range(0, len(positions), rows):
        yield lo, min(lo + rows, len(positions))


def _block(run: Run, layers: list[int], positions: np.ndarray, cols: slice, dtype: np.dtype,
           allow_lossy: bool) -> np.ndarray:
    """One read, sliced and converted, C-contiguous; Lossy where float16 would change a value not allowed to."""
    block = _read(run, layers, positions)[:, :, cols]
    if dtype != block.dtype:
        converted = block.astype(dtype)
        if not allow_lossy and not np.array_equal(converted.astype(block.dtype), block):
            raise Lossy(f"float16 would change values in layers {layers[0]}..{layers[-1]}; ask for float32, "
                        "or allow lossy")
        block = converted
    return np.ascontiguousarray(block)


def _read(run: Run, layers: list[int], positions: np.ndarray) -> np.ndarray:
    if _is_range(positions):  # no gather needed
        return run.read_states(layers, int(positions[0]), int(positions[0]) + len(positions))
    return run.read_rows(layers, positions)
