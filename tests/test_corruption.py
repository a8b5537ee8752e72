"""Corrupted stored bytes are reported as corruption, never served as numbers.

Real runs written through the store, real files damaged the way disks and operators damage them (a flipped
byte in a chunk or in a shard's index, a truncated shard, a shard of another run copied over), read through
every path: actstore's fast reader (runs with chunk checksums, and older runs without), zarr-python for
layouts the fast reader does not take, the raw chunks handed to servers, and a real gRPC server.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import grpc
import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from actstore.client import ActstoreError, Client
from actstore.server.process import ServerProcess
from actstore.store import CorruptData, Store
from actstore.store.layout import state_compressor, state_compressors
from actstore.testing import shard_key, synthetic_labels, write_synthetic_run

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")  # zarr on consolidate_metadata
MODEL, LAYER, SHARD = "tiny", 1, 1  # the damaged shard: layer 1, samples 32:64 (32 samples per shard here)
LAYOUTS = {  # how the run's states are stored: (shard index location, chunk codecs after Bytes)
    "checksummed": ("end", state_compressors),  # what runs are written with now: the fast reader
    "legacy": ("end", lambda: [state_compressor()]),  # runs written before chunks carried a checksum
    "zarr-only": ("start", state_compressors),  # a layout the fast reader leaves to zarr-python
}


def write_in_layout(
    root: Path, method: str, layout: str = "checksummed", hidden: int = 32, n: int = 100, n_layers: int = 3
) -> np.ndarray:
    """A run written through the store, its states then stored again under ``layout``; returns the states."""
    states = write_synthetic_run(Store(root), MODEL, method, n_layers, n, hidden, seed=len(method) + hidden)
    restore(root / MODEL / method / "hidden_states", states, layout)
    zarr.consolidate_metadata(root, path=f"{MODEL}/{method}")  # the run's snapshot of its arrays' metadata
    return states


def restore(path: Path, states: np.ndarray, layout: str) -> None:
    """Store ``states`` again at ``path`` with the chunk grid, fill value and attributes the store gave them."""
    old = zarr.open_array(path, mode="r")
    index_location, compressors = LAYOUTS[layout]
    new = zarr.create_array(
        path,
        shape=old.shape,
        dtype=old.dtype,
        chunks=old.chunks,
        overwrite=True,
        shards={"shape": old.shards, "index_location": index_location},
        compressors=compressors(),
        fill_value=old.fill_value,
        attributes=dict(old.attrs),
        dimension_names=old.metadata.dimension_names,
    )
    new[...] = states


def shard_file(root: Path, method: str, layer: int = LAYER, shard: int = SHARD) -> Path:
    return root / shard_key(MODEL, method, layer, shard)


def index_table(data: bytes, layout: str, n: int = 4) -> tuple[np.ndarray, int]:
    """(offset, size) rows of a shard's index of ``n`` inner chunks, and where the index starts."""
    at = len(data) - n * 16 - 4 if LAYOUTS[layout][0] == "end" else 0
    return np.frombuffer(data[at : at + n * 16], dtype="<u8").reshape(n, 2), at


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


def flip_chunk(root: Path, method: str, layout: str) -> None:
    offset = int(index_table(shard_file(root, method).read_bytes(), layout)[0][2, 0])
    flip(shard_file(root, method), offset + 40)  # inside the third inner chunk's compressed body


def flip_index(root: Path, method: str, layout: str) -> None:
    flip(shard_file(root, method), index_table(shard_file(root, method).read_bytes(), layout)[1] + 2 * 16)


def truncate(root: Path, method: str, layout: str) -> None:
    path = shard_file(root, method)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def foreign(root: Path, method: str, layout: str) -> None:
    """The same shard of a run of another width (48), in the same layout, copied over this one."""
    write_in_layout(root, "other", layout, hidden=48)
    shutil.copyfile(shard_file(root, "other"), shard_file(root, method))


DAMAGES = {
    "flipped chunk byte": flip_chunk,
    "flipped index byte": flip_index,
    "truncated shard": truncate,
    "foreign shard": foreign,
}
READS = {
    "read_states": lambda run: run.read_states([0, LAYER, 2]),
    "read_rows": lambda run: run.read_rows([LAYER], np.array([90, 50, 3, 41])),
    "encoded_states": lambda run: list(run.encoded_states(LAYER, 0, run.n_samples)),
}
CASES = [
    (layout, damage)
    for layout in LAYOUTS
    for damage in DAMAGES
    if not (layout == "legacy" and damage == "flipped chunk byte")
]  # no chunk checksum to catch it


def assert_names_the_damage(message: str, method: str) -> None:
    assert f"run {MODEL}/{method}" in message and re.search(rf"\blayers? (\d+, )*{LAYER}\b", message), message
    start, stop = map(int, re.search(r"samples (\d+):(\d+)", message).groups())
    assert start < (SHARD + 1) * 32 and stop > SHARD * 32, message  # the range overlaps the damaged shard


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("layout, damage", CASES)
def test_damaged_shards_raise_corrupt_data_naming_run_layer_and_samples(tmp_path, layout, damage, read):
    states = write_in_layout(tmp_path, "0shot", layout)
    DAMAGES[damage](tmp_path, "0shot", layout)
    run = Store(tmp_path).run(MODEL, "0shot")
    assert run.reader.direct == (layout != "zarr-only")
    with pytest.raises(CorruptData) as caught:
        READS[read](run)
    assert_names_the_damage(str(caught.value), "0shot")
    np.testing.assert_array_equal(run.read_states([0]), states[:1])  # what is intact still reads
    np.testing.assert_array_equal(run.read_states([LAYER], 64, 100), states[LAYER : LAYER + 1, 64:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_back_exactly_through_every_path(tmp_path, layout):
    states = write_in_layout(tmp_path, "0shot", layout)
    run = Store(tmp_path).run(MODEL, "0shot")
    np.testing.assert_array_equal(run.read_states([2, 0], 5, 77), states[[2, 0], 5:77])
    decoded = np.empty((100, 32), dtype=np.float32)
    for first, count, payload in run.encoded_states(LAYER, 3, 100):
        if isinstance(payload, bytes):  # what servers forward: a bare Blosc frame, as clients decode it
            payload = np.frombuffer(numcodecs.blosc.decompress(payload), "<f4")
        decoded[first : first + count] = np.asarray(payload).reshape(count, 32)
    np.testing.assert_array_equal(decoded[3:], states[LAYER, 3:])


def test_new_runs_checksum_every_chunk_for_every_zarr_reader(tmp_path):
    write_synthetic_run(Store(tmp_path), MODEL, "0shot", states=np.ones((2, 64, 32), dtype=np.float32))
    array = zarr.open_array(tmp_path / MODEL / "0shot" / "hidden_states", mode="r")
    assert isinstance(array.metadata.codecs[0].codecs[-1], Crc32cCodec)
    flip_chunk(tmp_path, "0shot", "checksummed")
    with pytest.raises(ValueError, match="checksum"):  # plain zarr-python readers are told too
        array[LAYER, 48:56]
    with pytest.raises(CorruptData, match=f"run {MODEL}/0shot, layer {LAYER}, samples 48:56"):
        Store(tmp_path).run(MODEL, "0shot").read_states([LAYER], 40, 50)


def test_bytes_that_rot_under_a_shard_already_verified_are_caught_on_the_next_read(tmp_path):
    """A whole shard read again is verified in one pass against the CRC its bytes had when each chunk last
    passed its own (reader.py): a byte flipped beneath the file system afterwards, the file's size and mtime
    unchanged so that its cached index stays, must fail that pass and be named like any corruption."""
    states = write_in_layout(tmp_path, "0shot")
    run = Store(tmp_path).run(MODEL, "0shot")
    for _ in range(2):
        np.testing.assert_array_equal(run.read_states([LAYER]), states[LAYER : LAYER + 1])
    assert any(index.passed for _, index in run.reader._indexes.values())  # the next read takes the one pass
    path = shard_file(tmp_path, "0shot")
    before = path.stat()
    flip_chunk(tmp_path, "0shot", "checksummed")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_mtime_ns, path.stat().st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    with pytest.raises(CorruptData, match="inner chunk: checksum mismatch") as caught:
        run.read_states([LAYER])
    assert_names_the_damage(str(caught.value), "0shot")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A run whose layers hold 2 MiB each (so whole-layer reads forward stored chunks), served by a real server."""
    root = tmp_path_factory.mktemp("served") / "store"
    with pytest.MonkeyPatch.context() as patch:
        from actstore.store import layout

        patch.setattr(layout, "INNER_CHUNK_BYTES", 8 * 1024)  # 8 samples of 256 per inner chunk
        patch.setattr(layout, "SHARD_BYTES", 64 * 1024)  # 64 per shard
        states = write_in_layout(root, "0shot", hidden=256, n=2048, n_layers=5)
    with ServerProcess(root, root.parent / "server.log") as server:
        yield root, server, states


@pytest.mark.parametrize(
    "encoded, damage, layer", [(False, "chunk", 1), (False, "index", 2), (True, "chunk", 3), (True, "index", 4)]
)
def test_the_server_answers_data_loss_and_keeps_serving(served, encoded, damage, layer):
    root, server, states = served
    path = shard_file(root, "0shot", layer=layer, shard=5)  # samples 320:384
    table, at = index_table(path.read_bytes(), "checksummed", n=8)
    flip(path, int(table[2, 0]) + 40 if damage == "chunk" else at + 2 * 16)  # the third chunk, or its entry
    samples = slice(0, 2048) if encoded else slice(300, 400)  # 2 MiB: sent as stored chunks; 100 KiB: decoded
    with Client(server.address) as client:
        with pytest.raises(ActstoreError) as caught:
            client.hidden_states(MODEL, "0shot", layers=layer, samples=samples)
        assert caught.value.code == grpc.StatusCode.DATA_LOSS, caught.value
        damaged = "336:344" if damage == "chunk" else "320:384"
        assert f"run {MODEL}/0shot, layer {layer}, samples {damaged}" in caught.value.message
        np.testing.assert_array_equal(client.hidden_states(MODEL, "0shot", layers=0).values[0], states[0])


def test_the_shard_record_grows_with_commits_and_covers_the_partial_shard(tmp_path):
    hidden, n_layers = 32, 3
    rng = np.random.default_rng(0)
    with Store(tmp_path).writer(MODEL, "0shot", recipe={"r": 1}, attrs={}, n_layers=n_layers, hidden=hidden) as w:
        for start in range(0, 100, 20):  # commits at 20, 40, ... 100 samples: shards of 32 fill at 40, 80
            w.add(rng.standard_normal((n_layers, 20, hidden), dtype=np.float32), synthetic_labels(start, 20))
            w.commit()
            record = Store(tmp_path).run(MODEL, "0shot").attrs["shard_record"]
            assert len(record["index_crc32c"]) == -(-(start + 20) // 32)  # the partly filled shard too
            assert record["partial"]["whole_chunks"] == (start + 20) % 32 // 8
    run = Store(tmp_path).run(MODEL, "0shot")
    assert run.read_states([0, 1, 2]).shape == (3, 100, hidden)  # every recorded shard matches its file
