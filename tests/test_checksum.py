"""The reader's checks agree with what zarr writes.

actstore verifies chunks with crc32c-rs while zarr writes them with google-crc32c: the two must compute the
same CRC-32C on every length (their fast paths differ by length: folding blocks, tails, short inputs), and
the batched chunk check must accept exactly the chunks zarr's codecs produce and name the one that fails.
"""

from __future__ import annotations

import asyncio

import google_crc32c
import numcodecs
import numpy as np
import pytest
from crc32c_rs import crc32c
from zarr.codecs import Crc32cCodec
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.dtype import Float32

from actstore.store.checksum import ChunkMismatch, Mismatch, chunk_frames, strip_crc32c

HIDDEN, ROWS = 48, 16
DECODED = ROWS * HIDDEN * 4


def test_same_crc_as_zarrs_implementation_on_every_length() -> None:
    rng = np.random.default_rng(0)
    lengths = [*range(0, 300), *rng.integers(300, 200_000, 300).tolist()]
    for n in lengths:
        data = rng.bytes(n)
        assert crc32c(data) == google_crc32c.value(data), n


def zarr_crc32c(frame: bytes) -> bytes:
    """``frame`` with the CRC that zarr's crc32c codec appends, from the codec itself."""
    spec = ArraySpec(
        shape=(len(frame),),
        dtype=Float32(),
        fill_value=0,
        config=ArrayConfig.from_dict({}),
        prototype=default_buffer_prototype(),
    )
    encoded = asyncio.run(Crc32cCodec()._encode_single(default_buffer_prototype().buffer.from_bytes(frame), spec))
    return encoded.to_bytes()


def stored_chunks(n: int) -> tuple[list[np.ndarray], bytes, list[tuple[int, int]]]:
    """n chunks of states as a shard stores them (Blosc, then zarr's CRC), end to end: (arrays, bytes, spans)."""
    blosc = numcodecs.Blosc("lz4hc", 3, numcodecs.Blosc.SHUFFLE)
    arrays = [np.random.default_rng(i).standard_normal((ROWS, HIDDEN), dtype=np.float32) for i in range(n)]
    chunks = [zarr_crc32c(blosc.encode(a)) for a in arrays]
    offsets = np.cumsum([0] + [len(c) for c in chunks[:-1]]).tolist()
    return arrays, b"".join(chunks), [(o, len(c)) for o, c in zip(offsets, chunks)]


def test_chunks_written_by_zarr_pass_and_decode_to_what_was_written() -> None:
    arrays, data, spans = stored_chunks(5)
    frames = chunk_frames(data, spans, checksummed=True, decoded_bytes=DECODED)
    for array, frame in zip(arrays, frames):
        assert np.array_equal(np.frombuffer(numcodecs.blosc.decompress(frame), np.float32).reshape(ROWS, HIDDEN), array)


@pytest.mark.parametrize("bad", [0, 2, 4])
def test_a_flipped_bit_names_its_chunk(bad: int) -> None:
    _, data, spans = stored_chunks(5)
    damaged = bytearray(data)
    damaged[spans[bad][0] + spans[bad][1] // 2] ^= 0x10
    with pytest.raises(ChunkMismatch, match="checksum mismatch") as caught:
        chunk_frames(bytes(damaged), spans, checksummed=True, decoded_bytes=DECODED)
    assert caught.value.position == bad


def test_chunks_too_short_or_of_another_size_are_mismatches() -> None:
    _, data, spans = stored_chunks(3)
    with pytest.raises(ChunkMismatch, match="too short") as caught:
        chunk_frames(data, [spans[0], (spans[1][0], 3)], checksummed=True, decoded_bytes=DECODED)
    assert caught.value.position == 1
    with pytest.raises(ChunkMismatch, match="decoding to"):  # a frame of other rows than the array's chunks
        chunk_frames(data, spans, checksummed=True, decoded_bytes=DECODED // 2)


def test_chunks_without_checksum_are_checked_for_their_blosc_sizes() -> None:
    _, data, spans = stored_chunks(2)
    plain = [(start, size - 4) for start, size in spans]  # the Blosc frames alone, as older runs store them
    assert [len(f) for f in chunk_frames(data, plain, checksummed=False, decoded_bytes=DECODED)] == [
        s for _, s in plain
    ]
    with pytest.raises(ChunkMismatch, match="Blosc frame"):
        chunk_frames(data, [(start, size - 1) for start, size in plain], checksummed=False, decoded_bytes=DECODED)


def test_index_bytes_are_stripped_only_when_their_crc_matches() -> None:
    stored = zarr_crc32c(b"index bytes of a shard")
    assert bytes(strip_crc32c(stored)) == b"index bytes of a shard"
    with pytest.raises(Mismatch, match="checksum mismatch"):
        strip_crc32c(stored[:3] + bytes([stored[3] ^ 1]) + stored[4:])
    with pytest.raises(Mismatch, match="too short"):
        strip_crc32c(stored[:4])
