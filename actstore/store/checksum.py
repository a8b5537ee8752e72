"""Verification of stored bytes as Zarr v3 writes them, for readers that bypass zarr-python's codec pipeline.

Zarr's ``crc32c`` codec appends the CRC-32C (Castagnoli) of the bytes before it, little-endian, to each
encoded chunk and to each shard index; Blosc frames start with a 16-byte header giving their decoded and
stored sizes. Checking both before decoding means a flipped bit, a truncated file or a frame from elsewhere
is reported as corruption instead of being decoded into wrong numbers (or into a huge allocation, since a
corrupt header could claim any decoded size). The CRC is google-crc32c, the implementation zarr itself
uses (hardware-accelerated, ~14 GB/s here).
"""

from __future__ import annotations

import google_crc32c
import numpy as np

CRC_BYTES = 4
BLOSC_HEADER_BYTES = 16


class Mismatch(ValueError):
    """Bytes that fail a check; the reader adds which run, layer and samples they belong to."""


def strip_crc32c(data: np.ndarray) -> np.ndarray:
    """``data`` (uint8) without its trailing CRC-32C, after checking that the CRC matches the rest."""
    if len(data) < CRC_BYTES:
        raise Mismatch(f"{len(data)} bytes, too short to hold a checksum")
    payload = data[:-CRC_BYTES]
    if google_crc32c.value(payload) != int.from_bytes(data[-CRC_BYTES:].tobytes(), "little"):
        raise Mismatch("checksum mismatch")
    return payload


def check_blosc_frame(frame: np.ndarray, decoded_bytes: int) -> None:
    """Raise Mismatch unless ``frame`` (uint8) is a whole Blosc frame that decodes to ``decoded_bytes``."""
    if len(frame) < BLOSC_HEADER_BYTES:
        raise Mismatch(f"a {len(frame)}-byte chunk, shorter than a Blosc header")
    nbytes, _, cbytes = (int(v) for v in frame[4:BLOSC_HEADER_BYTES].view("<u4"))
    if nbytes != decoded_bytes or cbytes != len(frame):
        raise Mismatch(f"a Blosc frame of {cbytes} bytes decoding to {nbytes}, where the chunk holds {len(frame)} "
                       f"bytes decoding to {decoded_bytes}")
