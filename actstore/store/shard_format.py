"""The Zarr v3 sharding format as actstore reads and writes it directly (reader.py, shards.py): which arrays
qualify, and a shard's index of chunk offsets and sizes, checked."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from actstore.store.checksum import CRC_BYTES, Mismatch, strip_crc32c

MISSING = 2**64 - 1  # an index entry's offset and size for a chunk never written
PLAIN = (BytesCodec, BloscCodec)  # inner chunk codecs of runs written before chunks carried a checksum
CHECKSUMMED = (BytesCodec, BloscCodec, Crc32cCodec)


@dataclass(frozen=True)
class Index:
    offsets: list[int]  # per inner chunk of the shard, MISSING where never written
    sizes: list[int]
    written: int  # how many chunks are not MISSING
    # by range of chunks read (first, stop) holding every written chunk: the CRC-32C of their bytes, read
    # together, when each of them last passed its own CRC (see StateReader._read_chunks)
    passed: dict[tuple[int, int], int] = field(default_factory=dict)


def inner_codecs(array: zarr.Array) -> tuple[type, ...] | None:
    """The codec types of the inner chunks when the array is sharded the way actstore reads and writes
    directly, else None."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    if (
        sharding.index_location != ShardingCodecIndexLocation.end
        or [type(c) for c in sharding.index_codecs] != [BytesCodec, Crc32cCodec]
        or array.metadata.chunk_key_encoding.separator != "/"
    ):
        return None
    return tuple(type(c) for c in sharding.codecs)


def parse_index(raw: bytes, n: int, data_end: int | None) -> Index:
    """The (offset, size) table of a shard's index bytes, after checking its CRC and, where the shard's size
    is known (files), that every chunk it points to lies inside its data (a corrupt offset must not become a
    read past the file; in a bucket such a read comes back short)."""
    if len(raw) != 16 * n + CRC_BYTES:
        raise Mismatch("index cut short")
    table = np.frombuffer(strip_crc32c(raw), dtype="<u8").reshape(n, 2)
    offsets, sizes = table[:, 0].copy(), table[:, 1].copy()
    missing = offsets == MISSING
    if not np.array_equal(missing, sizes == MISSING):
        raise Mismatch("index marks a chunk half missing")
    present_offsets = np.where(missing, 0, offsets)
    if data_end is not None and np.any(
        ~missing & ((present_offsets > data_end) | (sizes > data_end - np.minimum(present_offsets, data_end)))
    ):
        raise Mismatch(f"index points past the {data_end} bytes of chunk data")
    return Index(offsets=offsets.tolist(), sizes=sizes.tolist(), written=int(np.count_nonzero(~missing)))
