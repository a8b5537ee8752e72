"""States sent as the stored Blosc frames of whole inner chunks (``EncodedBlock``): the server forwards
what is on disk, the client decodes, and the wire carries ~3x fewer bytes than raw float32."""

from __future__ import annotations

import numcodecs
import numpy as np

from actstore.v1 import actstore_pb2 as pb


class MalformedBlock(ValueError):
    """A block whose frames decode to another number of rows than it announces."""


def encode_block(layer_index: int, sample_start: int, n_samples: int, frames: list[bytes]) -> pb.EncodedBlock:
    """One message block of consecutive stored frames of one layer, starting at ``sample_start``."""
    return pb.EncodedBlock(
        layer_index=layer_index,
        sample_start=sample_start,
        n_samples=n_samples,
        blosc=b"".join(frames),
        chunk_bytes=[len(f) for f in frames],
    )


def decode_block(block: pb.EncodedBlock, layer: np.ndarray) -> int:
    """Decode ``block`` into ``layer`` (sample, hidden) in place; the bytes written."""
    row, offset = block.sample_start, 0
    encoded = memoryview(block.blosc)
    for size in block.chunk_bytes:
        rows = np.frombuffer(numcodecs.blosc.decompress(encoded[offset : offset + size]), dtype="<f4")
        rows = rows.reshape(-1, layer.shape[1])
        layer[row : row + len(rows)] = rows
        row, offset = row + len(rows), offset + size
    if row != block.sample_start + block.n_samples:
        raise MalformedBlock("a stored block decoded to the wrong number of rows")
    return block.n_samples * layer.shape[1] * 4
