"""Stored Blosc chunks on the wire: the server's hand-written message parses as the protobuf it claims to be,
the client decodes float32 and float16 blocks bit for bit in place, and a block that does not decode to the
rows it announces is refused (the client reports it as DATA_LOSS), never written out of its place."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest

from actstore.v1 import actstore_pb2 as pb
from actstore.wire.states import MalformedBlock, blocks_message, decode_block


def frames_of(rows: np.ndarray, per_frame: int) -> list[bytes]:
    """``rows`` as Blosc frames of ``per_frame`` rows, as the store writes inner chunks."""
    codec = numcodecs.Blosc("zstd", 3, numcodecs.Blosc.SHUFFLE)
    return [codec.encode(np.ascontiguousarray(rows[i : i + per_frame])) for i in range(0, len(rows), per_frame)]


@pytest.mark.parametrize("dtype", ["<f4", "<f2"])
def test_blocks_round_trip_bit_for_bit_in_their_dtype(dtype):
    rng = np.random.default_rng(0)
    states = rng.standard_normal((3, 250, 40)).astype(dtype)
    wanted = [(2, 10, 200), (0, 0, 250)]  # (layer index, first sample, samples)
    message = pb.ReadStatesResponse.FromString(
        blocks_message([(i, s, n, frames_of(states[i, s : s + n], 64)) for i, s, n in wanted])
    )
    assert [(b.layer_index, b.sample_start, b.n_samples) for b in message.blocks] == wanted
    assert [len(b.chunk_bytes) for b in message.blocks] == [4, 4]
    out = np.full_like(states, np.nan)
    written = [decode_block(block, out) for block in message.blocks]
    assert written == [n * 40 * np.dtype(dtype).itemsize for _, _, n in wanted]
    assert out[2, 10:210].tobytes() == states[2, 10:210].tobytes() and out[0].tobytes() == states[0].tobytes()
    assert np.isnan(out[1]).all() and np.isnan(out[2, :10]).all() and np.isnan(out[2, 210:]).all()


def block(layer_index: int, start: int, n: int, frames: list[bytes]) -> pb.EncodedBlock:
    return pb.ReadStatesResponse.FromString(blocks_message([(layer_index, start, n, frames)])).blocks[0]


def test_a_block_that_does_not_decode_to_its_rows_is_refused_and_writes_nothing_outside_them():
    rows = np.arange(100 * 8, dtype="<f4").reshape(100, 8)
    frames = frames_of(rows, 25)
    out = np.zeros((2, 100, 8), dtype="<f4")
    bad = {
        "fewer rows than announced": block(0, 0, 100, frames[:3]),
        "more rows than announced": block(0, 0, 50, frames),
        "rows past the answer": block(0, 90, 100, frames),
        "another width": block(1, 0, 100, frames_of(rows.reshape(200, 4)[:100], 25)),
        "no such layer": block(2, 0, 100, frames),
        "not Blosc": block(0, 0, 100, [b"\x02\x01" + bytes(40)] * 4),
        "a frame cut within its header": block(0, 0, 100, [frames[0][:10], *frames[1:]]),
        "a frame cut after its header": block(0, 0, 100, [*frames[:3], frames[3][:100]]),
        "a frame with bytes past its end": block(0, 0, 25, [frames[0] + frames[1]]),
        "frames split elsewhere": block(0, 0, 100, [frames[0] + frames[1][:50], frames[1][50:], *frames[2:]]),
    }
    for name, malformed in bad.items():
        with pytest.raises(MalformedBlock):
            decode_block(malformed, out)
        assert not out[1].any(), name
