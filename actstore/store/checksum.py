"""Verification of stored bytes as Zarr v3 writes them, for readers that bypass zarr-python's codec pipeline.

Zarr's ``crc32c`` codec appends the CRC-32C (Castagnoli) of the bytes before it, little-endian, to each
encoded chunk and to each shard index; Blosc frames start with a 16-byte header giving their decoded and
stored sizes. Checking both before decoding means a flipped bit, a truncated file or a frame from elsewhere
is reported as corruption instead of being decoded into wrong numbers (or into a huge allocation, since a
corrupt header could claim any decoded size).

The CRC is crc32c-rs, which folds with carry-less multiplication (PCLMULQDQ, or VPCLMULQDQ on AVX-512
CPUs): ~0.3 us for a 15 KB chunk where google-crc32c, the implementation zarr writes with, takes ~0.6 us,
against ~5 us to decode the chunk. Both compute the same CRC-32C (tests/test_checksum.py). A shard's chunks
arrive in one read; the checks take views of it, never copies.
"""

from __future__ import annotations

import struct

from crc32c_rs import crc32c

CRC_BYTES = 4
RESIDUE = 0x48674BC7  # the CRC-32C of any bytes followed by their own CRC-32C, little-endian (CRC RevEng catalogue)
_BLOSC_SIZES = struct.Struct("<4xI4xI")  # a Blosc header: decoded size at bytes 4:8, stored size at 12:16


class Mismatch(ValueError):
    """Bytes that fail a check; the reader adds which run, layer and samples they belong to."""


class ChunkMismatch(Mismatch):
    """One of several chunks checked together fails; ``position`` is its place among them."""

    def __init__(self, position: int, why: str) -> None:
        super().__init__(why)
        self.position = position


def strip_crc32c(stored: bytes) -> memoryview:
    """The bytes that ``stored`` protects with its trailing CRC-32C, once the CRC matches.

    One pass over the bytes and their CRC together, compared with the residue: the same check as computing
    the CRC of the bytes alone and comparing it with the stored one, without cutting the two apart first.
    """
    if len(stored) <= CRC_BYTES:
        raise Mismatch(f"{len(stored)} bytes, too short to hold a checksum")
    if crc32c(stored) != RESIDUE:
        raise Mismatch("checksum mismatch")
    return memoryview(stored)[:-CRC_BYTES]


def span_crc(data: bytes) -> int:
    """The CRC-32C of all of ``data``, computed without holding the GIL (crc32c-rs releases it for large
    buffers), at ~80 GB/s here against ~50 GB/s chunk by chunk."""
    return crc32c(data)


def table_crc(index: bytes, entries: int) -> int:
    """The CRC-32C of the first ``entries`` (offset, size) entries of a shard index: what the shard record keeps
    of the last, partly filled shard's whole chunks, whose entries stay the same in every later version of the
    shard while a writer appends to it (the whole index's own CRC changes at every commit)."""
    return crc32c(bytes(memoryview(index)[: 16 * entries]))


def chunk_frames(
    data: bytes, spans: list[tuple[int, int]], checksummed: bool, decoded_bytes: int, crcs_checked: bool = False
) -> list[memoryview]:
    """The Blosc frames of the stored chunks at ``spans`` ((offset, size) pairs in ``data``), once each chunk's
    CRC-32C (where ``checksummed``) and each frame's sizes match; ChunkMismatch naming the first that fails.

    ``crcs_checked``: the caller found ``data`` to have the CRC-32C (``span_crc``) it had when every one of
    these chunks last passed its own CRC, so their bytes are verified already and only their frames are
    cut out and checked.
    """
    view = memoryview(data)
    frames = []
    for position, (start, size) in enumerate(spans):
        if checksummed:
            if size <= CRC_BYTES or (not crcs_checked and crc32c(view[start : start + size]) != RESIDUE):
                raise ChunkMismatch(
                    position, "checksum mismatch" if size > CRC_BYTES else f"{size} bytes, too short to hold a checksum"
                )
            size -= CRC_BYTES
        frame = view[start : start + size]
        if size < _BLOSC_SIZES.size:
            raise ChunkMismatch(position, f"a {size}-byte chunk, shorter than a Blosc header")
        nbytes, cbytes = _BLOSC_SIZES.unpack_from(frame)
        if nbytes != decoded_bytes or cbytes != size:
            raise ChunkMismatch(
                position,
                f"a Blosc frame of {cbytes} bytes decoding to {nbytes}, where the "
                f"chunk holds {size} bytes decoding to {decoded_bytes}",
            )
        frames.append(frame)
    return frames
