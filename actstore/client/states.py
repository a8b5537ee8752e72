"""Assembling a ReadStates stream into one array: raw chunks at their byte offsets, stored Blosc blocks
decoded in place on a few threads while the next messages arrive, and a stream that ends short or carries a
malformed block reported as DATA_LOSS."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent.futures import Future

import grpc
import numpy as np

from actstore.client.errors import ActstoreError
from actstore.pools import ForkSafePool, cores
from actstore.protocol import DTYPE_NAMES
from actstore.v1 import actstore_pb2 as pb
from actstore.wire.columns import column_coords
from actstore.wire.labels import label_coords
from actstore.wire.states import MalformedBlock, decode_block

# No more decoders than cores: with a server on the same 2 cores, 4 threads served a sequential feed ~12 %
# slower than 2, and one layer's tokens ~8 % slower (docs/benchmarks.md, "Feed").
_DECODE = ForkSafePool(max_workers=min(4, cores()), thread_name_prefix="actstore-decode")
MAX_PENDING = 8  # blocks decoding or waiting at once: what a stream holds beyond its answer (~0.5 MiB each)


def receive_states(
    stream: Iterator[pb.ReadStatesResponse], out: np.ndarray | None = None
) -> tuple[pb.StatesHeader, np.ndarray]:
    """The header and the array of a ReadStates stream (a gRPC call: cancelled when left early), written into
    ``out`` when given (see ``Client.hidden_states``)."""
    pending: collections.deque[Future[int]] = collections.deque()
    try:
        header = None
        received = 0
        for message in stream:
            if header is None:
                header = message.header
                data = _answer_array(header, out)
                flat = data.reshape(-1).view(np.uint8)
            chunk = message.chunk
            flat[chunk.offset : chunk.offset + len(chunk.data)] = np.frombuffer(chunk.data, dtype=np.uint8)
            received += len(chunk.data)
            for block in message.blocks:  # stored chunks, forwarded undecoded by the server
                pending.append(_DECODE.submit(decode_block, block, data))
                while len(pending) > MAX_PENDING:
                    received += pending.popleft().result()
        while pending:
            received += pending.popleft().result()
    except MalformedBlock as exc:
        raise ActstoreError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
    finally:
        stream.cancel()  # a no-op once complete; stops the server's work if we leave early
        for job in pending:  # left early: no thread writes into the array after this returns
            job.cancel() or job.exception()
    if header is None:
        raise ActstoreError(grpc.StatusCode.DATA_LOSS, "the server's stream ended before its header")
    if received != flat.size:
        raise ActstoreError(grpc.StatusCode.DATA_LOSS, f"received {received} of {flat.size} bytes")
    return header, data


def _answer_array(header: pb.StatesHeader, out: np.ndarray | None) -> np.ndarray:
    """Where the answer goes: ``out``, checked against the header, or a new array."""
    shape, dtype = tuple(header.shape), np.dtype(DTYPE_NAMES[header.dtype])
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        layout = "" if out.flags.c_contiguous else ", not C-contiguous"
        raise ValueError(f"out is {out.dtype} {out.shape}{layout}; the answer is {dtype} {shape}, C-contiguous")
    return out


def header_coords(header: pb.StatesHeader) -> dict[str, np.ndarray]:
    """Each row's coordinates in an answer, as arrays (row,): a capture run's columns (sample, position, token_id,
    its labels), or a question run's sample ids and labels."""
    coords = column_coords(header.columns, header.dims[1]) if header.columns else label_coords(header.labels)
    return {name: value[1] if isinstance(value, tuple) else value for name, value in coords.items()}
