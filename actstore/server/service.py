"""The gRPC services: a catalog of runs and streamed reads, each call authorised against run access."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np

from actstore.protocol import CHUNK_BYTES, DTYPE_ENUMS, DTYPE_NAMES, VISIBILITY_ENUMS, VISIBILITY_NAMES
from actstore.server import selection
from actstore.server.auth import Authenticator, Caller
from actstore.server.errors import Forbidden, Lossy, TooLarge, status_of
from actstore.store import Run, RunNotFound, Store
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_DETAILS_CHARS = 1000  # status details travel in HTTP/2 trailers, which peers cap at a few KiB


def rpc(method: Callable) -> Callable:
    """Resolve the caller, map errors to precise statuses, and log each call (never its token)."""

    def finish(self, context, name: str, started: float, caller: Caller | None, exc: Exception | None) -> None:
        code = grpc.StatusCode.OK if exc is None else status_of(exc)
        who = "-" if caller is None else (caller.group or "open")
        log.info("%s group=%s status=%s %.1f ms", name, who, code.name, (time.perf_counter() - started) * 1e3)
        if exc is not None:
            if code is grpc.StatusCode.INTERNAL:
                log.exception("internal error in %s", name, exc_info=exc)
            details = str(exc) if code is not grpc.StatusCode.INTERNAL else "internal server error"
            context.abort(code, details if len(details) <= MAX_DETAILS_CHARS else details[:MAX_DETAILS_CHARS] + "...")

    if inspect.isgeneratorfunction(method):  # server streaming: the body runs as the response is consumed

        @functools.wraps(method)
        def streaming(self, request, context):
            started, caller = time.perf_counter(), None
            try:
                caller = self.auth.caller(context.invocation_metadata())
                yield from method(self, request, context, caller)
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                finish(self, context, method.__name__, started, caller, exc)
            else:
                finish(self, context, method.__name__, started, caller, None)

        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        started, caller = time.perf_counter(), None
        try:
            caller = self.auth.caller(context.invocation_metadata())
            response = method(self, request, context, caller)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            finish(self, context, method.__name__, started, caller, exc)
        finish(self, context, method.__name__, started, caller, None)
        return response

    return unary


class _Base:
    def __init__(self, store: Store, auth: Authenticator, max_response_bytes: int) -> None:
        self.store = store
        self.auth = auth
        self.max_response_bytes = max_response_bytes

    def readable_run(self, ref: pb.RunRef, caller: Caller) -> Run:
        """The run, or NOT_FOUND worded alike whether it is absent or hidden from this caller (AIP-211):
        a different answer would tell outsiders which private runs exist."""
        absent = RunNotFound(f"no run {ref.model}/{ref.method}")  # not the store's message: it lists every run
        try:
            run = self.store.run(ref.model, ref.method)
        except RunNotFound:
            raise absent from None
        if not caller.can_read(run.access):
            raise absent
        return run


def summary(run: Run) -> pb.RunSummary:
    n_layers, n_samples, hidden = run.shape
    access = run.access
    return pb.RunSummary(
        run=pb.RunRef(model=run.model, method=run.method), n_layers=n_layers, n_samples=n_samples, hidden=hidden,
        accuracy=run.accuracy, complete=run.complete,
        access=pb.Access(owner_group=access["owner_group"] or "", visibility=VISIBILITY_ENUMS[access["visibility"]],
                         shared_with=access["shared_with"]),
    )


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
    def ListRuns(self, request: pb.ListRunsRequest, context, caller: Caller) -> pb.ListRunsResponse:
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
    def DescribeRun(self, request: pb.DescribeRunRequest, context, caller: Caller) -> pb.RunInfo:
        run = self.readable_run(request.run, caller)
        return describe(run)

    @rpc
    def SetVisibility(self, request: pb.SetVisibilityRequest, context, caller: Caller) -> pb.RunInfo:
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
    def ReadLabels(self, request: pb.ReadLabelsRequest, context, caller: Caller) -> pb.ReadLabelsResponse:
        run = self.readable_run(request.run, caller)
        positions = selection.positions(request.samples, run.labels(), run.sample_order)
        return pb.ReadLabelsResponse(labels=_labels(run, positions), run_complete=run.complete)

    @rpc
    def ReadStates(self, request: pb.ReadStatesRequest, context, caller: Caller) -> Iterator[pb.ReadStatesResponse]:
        run = self.readable_run(request.run, caller)
        n_layers, _, n_hidden = run.shape
        layers = selection.layers(request, n_layers)
        positions = selection.positions(request.samples, run.labels(), run.sample_order)
        cols = selection.hidden(request, n_hidden)
        if request.dtype not in DTYPE_NAMES:
            raise selection.BadRequest(f"unknown dtype {request.dtype}")
        dtype = np.dtype(DTYPE_NAMES[request.dtype])
        shape = (len(layers), len(positions), cols.stop - cols.start)
        size = int(np.prod(shape)) * dtype.itemsize
        if size > self.max_response_bytes:
            raise TooLarge(f"the selection is {size / 2**20:.1f} MiB, above this server's cap of "
                           f"{self.max_response_bytes / 2**20:.0f} MiB per request: ask for fewer layers or samples")
        header = pb.StatesHeader(
            shape=shape, dtype=DTYPE_ENUMS[dtype.name], dims=["layer", "sample", "hidden"], layers=layers,
            labels=_labels(run, positions), hidden_start=cols.start, run_complete=run.complete)
        whole_rows = dtype == np.float32 and cols == slice(0, n_hidden)
        if request.accept_blosc and whole_rows and size >= CHUNK_BYTES and _is_range(positions):
            messages = _stored_chunks(run, layers, int(positions[0]), len(positions))
        else:
            messages = _raw_chunks(_blocks(run, layers, positions, cols, dtype, request.allow_lossy))
        sent = 0
        try:
            for message, nbytes in messages:
                if not context.is_active():  # deadline passed or client gone: stop reading the store
                    break
                if sent == 0:
                    message.header.CopyFrom(header)
                yield message
                sent += nbytes
        except GeneratorExit:  # gRPC closes the stream's generator when the client cancels
            pass
        if sent < size:
            log.info("ReadStates cancelled by the client after %d of %d bytes; stopped reading", sent, size)


Message = tuple[pb.ReadStatesResponse, int]  # a response and the bytes of the answer it carries


def _raw_chunks(blocks: Iterator[np.ndarray]) -> Iterator[Message]:
    offset = 0
    for piece in _chunks(blocks):
        yield pb.ReadStatesResponse(chunk=pb.StatesChunk(offset=offset, data=piece)), len(piece)
        offset += len(piece)


def _stored_chunks(run: Run, layers: list[int], first: int, n: int) -> Iterator[Message]:
    """A sample range of whole rows as the stored Blosc chunks, undecoded: runs of consecutive chunks
    travel as one EncodedBlock, about CHUNK_BYTES of them per message."""
    row_bytes = run.shape[2] * 4
    blocks: list[pb.EncodedBlock] = []
    wire = carried = 0
    for index, layer in enumerate(layers):
        pieces: list[bytes] = []
        run_start = run_count = 0
        for start, count, payload in run.encoded_states(layer, first, first + n):
            if isinstance(payload, bytes):
                if not pieces:
                    run_start, run_count = start - first, 0
                pieces.append(payload)
                run_count += count
                wire, carried = wire + len(payload), carried + count * row_bytes
            else:  # a partial chunk at either end of the range, decoded
                offset = (index * n + start - first) * row_bytes
                yield pb.ReadStatesResponse(chunk=pb.StatesChunk(offset=offset, data=payload.tobytes())), payload.nbytes
            if pieces and (wire >= CHUNK_BYTES or not isinstance(payload, bytes)):
                blocks.append(_encoded_block(index, run_start, run_count, pieces))
                pieces = []
            if wire >= CHUNK_BYTES:
                yield pb.ReadStatesResponse(blocks=blocks), carried
                blocks, wire, carried = [], 0, 0
        if pieces:
            blocks.append(_encoded_block(index, run_start, run_count, pieces))
    if blocks:
        yield pb.ReadStatesResponse(blocks=blocks), carried


def _encoded_block(layer_index: int, sample_start: int, n_samples: int, pieces: list[bytes]) -> pb.EncodedBlock:
    return pb.EncodedBlock(layer_index=layer_index, sample_start=sample_start, n_samples=n_samples,
                           blosc=b"".join(pieces), chunk_bytes=[len(p) for p in pieces])


def _is_range(positions: np.ndarray) -> bool:
    first = int(positions[0])
    return bool(np.array_equal(positions, np.arange(first, first + len(positions))))


def _chunks(blocks: Iterator[np.ndarray]) -> Iterator[bytes]:
    """Re-cut blocks of any size into messages of CHUNK_BYTES (the last one shorter): few, full messages."""
    pending = b""
    for block in blocks:
        view = memoryview(block).cast("B")
        if pending:
            take = CHUNK_BYTES - len(pending)
            pending += bytes(view[:take])
            view = view[take:]
            if len(pending) < CHUNK_BYTES:
                continue
            yield pending
        whole = len(view) - len(view) % CHUNK_BYTES
        for start in range(0, whole, CHUNK_BYTES):
            yield bytes(view[start : start + CHUNK_BYTES])
        pending = bytes(view[whole:])
    if pending:
        yield pending


def _blocks(run: Run, layers: list[int], positions: np.ndarray, cols: slice, dtype: np.dtype,
            allow_lossy: bool) -> Iterator[np.ndarray]:
    """The answer in C order, a bounded block at a time: at most one shard's worth of samples per layer.

    A selection that fits in one block is read for all layers at once (one sample across every layer
    is the latency-critical case); larger ones layer by layer, block by block.
    """
    step = run.hidden_states.shards[1] if run.hidden_states.shards else run.hidden_states.chunks[1]
    groups = [layers] if len(positions) <= step else [[layer] for layer in layers]
    for group in groups:
        for start in range(0, len(positions), step):
            block = _read(run, group, positions[start : start + step])[:, :, cols]
            if dtype != block.dtype:
                converted = block.astype(dtype)
                if not allow_lossy and not np.array_equal(converted.astype(block.dtype), block):
                    raise Lossy(f"float16 would change values in layers {group[0]}..{group[-1]}; ask for float32, "
                                "or allow lossy")
                block = converted
            yield np.ascontiguousarray(block)


def _read(run: Run, layers: list[int], positions: np.ndarray) -> np.ndarray:
    if _is_range(positions):  # no gather needed
        return run.read_states(layers, int(positions[0]), int(positions[0]) + len(positions))
    return run.read_rows(layers, positions)
