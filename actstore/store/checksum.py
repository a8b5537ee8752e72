"""Verification of stored bytes as Zarr v3 writes them, for readers that bypass zarr-python's codec pipeline.

Zarr's ``crc32c`` codec appends the CRC-32C (Castagnoli) of the bytes before it, little-endian, to each
encoded chunk and to each shard index; Blosc frames start with a 16-byte header giving their decoded and
stored sizes. Checking both before decoding means a flipped bit, a truncated file or a frame from elsewhere
is reported as corruption instead of being decoded into wrong numbers (or into a huge allocation, since a
corrupt header could claim any decoded size). The CRC is google-crc32c, the implementation zarr itself
uses (hardware-accelerated: ~0.8 us for a 22 KB chunk, against ~10 us to decode it).

A shard's chunks arrive in one ``pread``; the checks take views of it, never copies.
"""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np

CRC_BYTES = 4
RESIDUE = 0x48674BC7  # the CRC-32C of any bytes followed by their own CRC-32C, little-endian (CRC RevEng catalogue)
_BLOSC_SIZES = struct.Struct("<4xI4xI")  # a Blosc header: decoded size at bytes 4:8, stored size at 12:16


class Mismatch(ValueError):
    """Bytes that fail a check; the reader adds which run, layer and samples they belong to."""


def strip_crc32c(stored: bytes | np.ndarray) -> memoryview | np.ndarray:
    """The bytes that ``stored`` (bytes or a uint8 array) protects with its trailing CRC-32C, once the CRC matches.

    One pass over the bytes and their CRC together, compared with the residue: the same check as computing
    the CRC of the bytes alone and comparing it with the stored one, without cutting the two apart first.
    """
    if len(stored) <= CRC_BYTES:
        raise Mismatch(f"{len(stored)} bytes, too short to hold a checksum")
    if google_crc32c.value(stored) != RESIDUE:
        raise Mismatch("checksum mismatch")
    return (stored if isinstance(stored, np.ndarray) else memoryview(stored))[:-CRC_BYTES]  # a view, not a copy


def check_blosc_frame(frame: memoryview | np.ndarray, decoded_bytes: int) -> None:
    """Raise Mismatch unless ``frame`` is one whole Blosc frame that decodes to ``decoded_bytes``."""
    if len(frame) < _BLOSC_SIZES.size:
        raise Mismatch(f"a {len(frame)}-byte chunk, shorter than a Blosc header")
    nbytes, cbytes = _BLOSC_SIZES.unpack_from(frame)
    if nbytes != decoded_bytes or cbytes != len(frame):
        raise Mismatch(f"a Blosc frame of {cbytes} bytes decoding to {nbytes}, where the chunk holds "
                       f"{len(frame)} bytes decoding to {decoded_bytes}")
