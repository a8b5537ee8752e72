"""Verification of stored bytes as Zarr v3 writes them, for readers that bypass zarr-python's codec pipeline.

Zarr's ``crc32c`` codec appends the CRC-32C (Castagnoli) of the bytes before it, little-endian, to each
encoded chunk and to each shard index; Blosc frames start with a 16-byte header giving their decoded and
stored sizes. Checking both before decoding means a flipped bit, a truncated file or a frame from elsewhere
is reported as corruption instead of being decoded into wrong numbers (or into a huge allocation, since a
corrupt header could claim any decoded size). The CRC is google-crc32c, the implementation zarr itself
uses (hardware-accelerated: ~0.8 us for a 22 KB chunk, against ~10 us to decode it).

Both checks take a buffer and a byte range rather than a slice: a shard's chunks arrive in one ``pread``,
and slicing each out first would copy it.
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


def crc32c_end(buffer: bytes, start: int, stop: int) -> int:
    """Where the bytes that ``buffer[start:stop]`` protects with its trailing CRC-32C end, once the CRC matches.

    One pass over the bytes and their CRC together, compared with the residue: the same check as computing
    the CRC of the bytes alone and comparing it with the stored one, without cutting the two apart.
    """
    if stop - start <= CRC_BYTES:
        raise Mismatch(f"{stop - start} bytes, too short to hold a checksum")
    whole = buffer if start == 0 and stop == len(buffer) else np.frombuffer(buffer, np.uint8, stop - start, start)
    if google_crc32c.value(whole) != RESIDUE:
        raise Mismatch("checksum mismatch")
    return stop - CRC_BYTES


def check_blosc_frame(buffer: bytes, start: int, stop: int, decoded_bytes: int) -> None:
    """Raise Mismatch unless ``buffer[start:stop]`` is one whole Blosc frame that decodes to ``decoded_bytes``."""
    if stop - start < _BLOSC_SIZES.size:
        raise Mismatch(f"a {stop - start}-byte chunk, shorter than a Blosc header")
    nbytes, cbytes = _BLOSC_SIZES.unpack_from(buffer, start)
    if nbytes != decoded_bytes or cbytes != stop - start:
        raise Mismatch(f"a Blosc frame of {cbytes} bytes decoding to {nbytes}, where the chunk holds "
                       f"{stop - start} bytes decoding to {decoded_bytes}")
