"""DataService: a run's labels in one message, and its hidden states streamed within the server's byte
budget, every check made before anything is read."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

import grpc
import numpy as np

from actstore.protocol import CHUNK_BYTES, DTYPE_ENUMS, DTYPE_NAMES, MAX_MESSAGE_BYTES
from actstore.server import capture_rows, selection
from actstore.server.auth import Caller
from actstore.server.errors import TooLarge
from actstore.server.gate import Stalled
from actstore.server.rpc import Servicer, rpc
from actstore.server.state_messages import (
    READ_BYTES,
    Message,
    Source,
    is_range,
    next_message,
    raw_messages,
    stored_chunks,
)
from actstore.store import Run
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc
from actstore.wire.labels import LABEL_ROW_BYTES, encode_labels, labels_bytes

log = logging.getLogger(__name__)

MAX_LABEL_BYTES = MAX_MESSAGE_BYTES * 3 // 4  # labels travel in one message (ReadLabels, the states' header)
MESSAGE_SLACK = 128 << 10  # a message's bytes beyond READ_BYTES: one stored chunk past the size, framing


class DataService(Servicer, pb_grpc.DataServiceServicer):
    @rpc
    def ReadLabels(self, request: pb.ReadLabelsRequest, caller: Caller) -> pb.ReadLabelsResponse:
        wanted = selection.sample_ids(request.samples)
        run = self.readable_run(request.run, caller)
        if run.capture is not None:
            rows = capture_rows.rows(request.samples, wanted, run)
            self.check_capture_size("labels' answer", 0, run, rows)
            return pb.ReadLabelsResponse(
                columns=capture_rows.columns(run, rows), row_dim=run.row_dim, run_complete=run.complete
            )
        selection.question_run(request.samples, "", run)
        positions = selection.positions(request.samples, wanted, run.labels(), run.sample_order)
        self.check_size("labels' answer", 0, len(positions), lambda: labels_bytes(run.labels(), positions))
        return pb.ReadLabelsResponse(labels=encode_labels(run.labels(), positions), run_complete=run.complete)

    @rpc
    async def ReadStates(
        self, request: pb.ReadStatesRequest, context: grpc.aio.ServicerContext, caller: Caller
    ) -> None:
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

    def check_size(
        self,
        what: str,
        states_bytes: int,
        n_samples: int,
        label_bytes: Callable[[], int],
        row_bytes: int = LABEL_ROW_BYTES,
        rows: str = "samples",
    ) -> None:
        """Refuse, before any of it is read, an answer above the response cap or labels above one message.

        ``label_bytes`` is called only when the framing alone fits (``row_bytes`` a row at least): a huge
        selection is refused in O(1).
        """
        split = f"ask for fewer layers or {rows} (e.g. consecutive {rows[:-1]} ranges, one request each)"
        if n_samples * row_bytes > MAX_LABEL_BYTES or states_bytes > self.max_response_bytes:
            labels = n_samples * row_bytes
        else:
            labels = label_bytes()
        if labels > MAX_LABEL_BYTES:
            raise TooLarge(
                f"the labels of {n_samples:,} {rows} take {labels / 2**20:.1f} MiB or more, above the "
                f"{MAX_LABEL_BYTES / 2**20:.0f} MiB one message carries: {split}"
            )
        size = states_bytes + labels
        if size > self.max_response_bytes:
            raise TooLarge(
                f"the {what} is {size / 2**20:.1f} MiB, above this server's cap of "
                f"{self.max_response_bytes / 2**20:.3g} MiB per request: {split}"
            )

    async def _send_next(
        self, context: grpc.aio.ServicerContext, messages: Iterator[Message], header: bytes, left: int
    ) -> int | None:
        """Read and write the next message (``header`` in front) within a reservation of its size; the
        bytes of the answer it carried, or None at the end. Between two messages the stream holds none."""
        async with self.streams.reserve(min(max(left, 0), READ_BYTES) + MESSAGE_SLACK + len(header)):
            item = await self.offload(next_message, messages, header)
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
        return (
            f"the client read none of this stream for {self.streams.idle_s:g} s, this server's limit "
            "(actstore serve --stream-idle-timeout): read a stream as it arrives"
        )

    def check_capture_size(self, what: str, states_bytes: int, run: Run, rows: np.ndarray) -> None:
        """``check_size`` for a capture run's rows and their coordinates."""
        self.check_size(
            what,
            states_bytes,
            len(rows),
            lambda: capture_rows.columns_bytes(run, rows),
            row_bytes=capture_rows.min_row_bytes(run),
            rows="tokens" if run.row_dim == "token" else "samples",
        )

    def _plan_read(self, request: pb.ReadStatesRequest, caller: Caller) -> tuple[bytes, Iterator[Message], int]:
        """The header (a serialized response holding it), the messages to send (read lazily) and the answer's
        size; every check before any read."""
        wanted = selection.sample_ids(request.samples)
        if request.dtype not in DTYPE_NAMES:
            raise selection.BadRequest(f"unknown dtype {request.dtype}")
        run = self.readable_run(request.run, caller)
        if run.capture is not None:
            return self._plan_capture_read(request, wanted, run)
        selection.question_run(request.samples, request.site, run)
        n_layers, _, n_hidden = run.shape
        layers = selection.layers(request, n_layers)
        cols = selection.hidden(request, n_hidden)
        positions = selection.positions(request.samples, wanted, run.labels(), run.sample_order)
        dtype = np.dtype(DTYPE_NAMES[request.dtype])
        shape = (len(layers), len(positions), cols.stop - cols.start)
        size = int(np.prod(shape)) * dtype.itemsize
        self.check_size("selection", size, len(positions), lambda: labels_bytes(run.labels(), positions))
        header = pb.StatesHeader(
            shape=shape,
            dtype=DTYPE_ENUMS[dtype.name],
            dims=["layer", "sample", "hidden"],
            layers=layers,
            labels=encode_labels(run.labels(), positions),
            hidden_start=cols.start,
            run_complete=run.complete,
        )
        return self._planned(request, header, Source(run, None, dtype), layers, positions, cols)

    def _plan_capture_read(
        self, request: pb.ReadStatesRequest, wanted: np.ndarray | None, run: Run
    ) -> tuple[bytes, Iterator[Message], int]:
        """``_plan_read`` of a capture run: one site, rows with their coordinates, sent as stored unless
        another dtype is asked for (float16 widened to float32 exactly; float32 narrowed only losslessly)."""
        site = capture_rows.site_of(run, request.site)
        stored = np.dtype(run.states(site).dtype)
        n_layers, _, width = run.states(site).shape
        layers = selection.layers(request, n_layers)
        cols = selection.hidden(request, width)
        rows = capture_rows.rows(request.samples, wanted, run)
        dtype = stored if request.dtype == pb.DTYPE_UNSPECIFIED else np.dtype(DTYPE_NAMES[request.dtype])
        shape = (len(layers), len(rows), cols.stop - cols.start)
        size = int(np.prod(shape)) * dtype.itemsize
        self.check_capture_size("selection", size, run, rows)
        header = pb.StatesHeader(
            shape=shape,
            dtype=DTYPE_ENUMS[dtype.name],
            dims=["layer", run.row_dim, run.capture.width_dim(site)],
            layers=layers,
            columns=capture_rows.columns(run, rows),
            site=site,
            hidden_start=cols.start,
            run_complete=run.complete,
        )
        return self._planned(request, header, Source(run, site, dtype), layers, rows, cols)

    def _planned(
        self,
        request: pb.ReadStatesRequest,
        header: pb.StatesHeader,
        source: Source,
        layers: list[int],
        positions: np.ndarray,
        cols: slice,
    ) -> tuple[bytes, Iterator[Message], int]:
        """The serialized header, the messages (stored Blosc chunks where the client decodes them in the
        dtype asked for, which is the stored one, and the read is a range of whole rows; raw bytes otherwise)
        and the answer's size."""
        size = int(np.prod(tuple(header.shape))) * source.dtype.itemsize
        decoded = {np.float32: request.accept_blosc, np.float16: request.accept_blosc_float16}
        as_stored = source.dtype == np.dtype(source.array.dtype) and decoded.get(source.dtype.type, False)
        whole_rows = as_stored and cols == slice(0, source.width)
        if whole_rows and size >= CHUNK_BYTES and is_range(positions):
            messages = stored_chunks(source, layers, int(positions[0]), len(positions))
        else:
            messages = raw_messages(source, layers, positions, cols, request.allow_lossy)
        return pb.ReadStatesResponse(header=header).SerializeToString(), messages, size
