"""States written by the direct shard writer (actstore/store/shards.py), as RunWriter commits them.

Real runs in a folder and in a bucket (moto's S3 server on loopback, ``any_store``), float32 question runs and
float16 capture runs, both with 8 rows per inner chunk and 32 per shard (conftest's small chunks), written in
commits of uneven sizes: ending mid chunk, on a chunk's end, across one and several shards, on a shard's end
and one row past it. They must read back bit for bit through zarr-python, through the fast reader with the
shard record of every commit, and through xarray's ``open_zarr``; a shard written the same way by zarr-python
must be the same bytes; damaged bytes must still be CorruptData; a failed write must keep every commit.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from actstore.store import CorruptData, Store
from actstore.store.capture import CaptureLayout
from actstore.store.errors import StoreNotWritable
from actstore.store.folder import Folder, _FolderStore
from actstore.store.layout import capture_compressors, state_compressors
from actstore.store.run import STATES, _past_the_end
from actstore.store.shards import ShardWriter
from actstore.testing import read_object, synthetic_labels, write_object

MODEL, METHOD, SITE = "m", "0shot", "resid"
COMMITS = [5, 3, 13, 30, 45, 1, 70]  # ends at 5, 8, 21, 51, 96, 97, 167: mid chunk, chunk end, across shards...
N = sum(COMMITS)
MISSING = 2**64 - 1
DIMS = ("layer", "sample", "hidden")
WIDTHS = {"float32": 32, "float16": 64}  # 8 rows per inner chunk, 32 per shard in both (conftest)


def bits(values: np.ndarray) -> np.ndarray:
    """Values as their bit patterns: equal only if stored and read back bit for bit (NaNs included)."""
    values = np.ascontiguousarray(values)
    return values.view(np.uint32 if values.dtype == np.float32 else np.uint16)


def ends(commits: list[int], first: int = 0) -> list[tuple[int, int]]:
    bounds = np.cumsum([first, *commits]).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def random_states(dtype: str, n: int = N, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((3, n, WIDTHS[dtype]), dtype=np.float32)
    return values.astype(dtype)


def capture_rows(start: int, stop: int) -> dict[str, np.ndarray]:
    rows = np.arange(start, stop)
    return {"sample": rows // 4, "position": rows % 4, "token_id": rows % 7}


def write_run(store: Store, dtype: str, states: np.ndarray, commits: list[int], check=None, first: int = 0) -> str:
    """A run written through RunWriter, one commit per entry of ``commits``: a question run (float32,
    ``hidden_states``) or a capture run of one float16 site; returns the name of its states array. ``first``:
    the rows committed before (a resumed run). ``check(stop)`` runs after each commit, the writer still open."""
    if dtype == "float32":
        writer = store.writer(MODEL, METHOD, recipe={"r": 1}, attrs={}, n_layers=3, hidden=WIDTHS[dtype])
        name, labels = STATES, lambda a, b: synthetic_labels(a, b - a)
    else:
        writer = store.begin_run(MODEL, METHOD, recipe={"r": 1})
        capture = CaptureLayout(rows="token", n_layers=3, hidden=64, sites={SITE: 64}, store_dtype="float16")
        writer.start(provenance={}, capture=capture, planned=N // 4)
        name, labels = SITE, capture_rows
    with writer:
        for start, stop in ends(commits, first):
            batch = states[:, start:stop] if dtype == "float32" else {SITE: states[:, start:stop]}
            writer.add(batch, labels(start, stop))
            writer.commit()
            if check is not None:
                check(stop)
    return name


def open_states(store: Store, name: str) -> zarr.Array:
    """The states array as plain zarr-python opens it, from its own metadata."""
    return zarr.open_array(store=Store(store.url).location.zarr_store(), path=f"{MODEL}/{METHOD}/{name}", mode="r")


@pytest.mark.parametrize("dtype", WIDTHS)
def test_commits_of_uneven_sizes_read_back_bit_for_bit_through_every_reader(any_store, dtype):
    states = random_states(dtype)
    site = None if dtype == "float32" else SITE

    def read_by_a_new_reader(stop: int) -> None:
        run = Store(any_store.url).run(MODEL, METHOD)
        reader = run.reader_of(site)
        assert reader.direct and reader.chunk_crc and reader.shard_record is not None  # checked against it
        assert run.n_samples == stop
        np.testing.assert_array_equal(bits(run.read_states([0, 1, 2], site=site)), bits(states[:, :stop]))

    name = write_run(any_store, dtype, states, COMMITS, check=read_by_a_new_reader)
    array = open_states(any_store, name)
    assert array.dtype == np.dtype(dtype) and array.chunks[1:] == (8, WIDTHS[dtype]) and array.shards[1] == 32
    np.testing.assert_array_equal(bits(array[...]), bits(states))
    np.testing.assert_array_equal(bits(array[1, 29:99]), bits(states[1, 29:99]))

    run = Store(any_store.url).run(MODEL, METHOD)
    np.testing.assert_array_equal(bits(run.read_states([2, 0], 50, 161, site=site)), bits(states[[2, 0], 50:161]))
    rows = np.array([166, 0, 96, 95, 31, 32, 50])
    np.testing.assert_array_equal(bits(run.read_rows([1], rows, site=site)), bits(states[1:2, rows]))

    dataset = any_store.location.open_xarray(run.key)  # xarray's open_zarr, on the run's consolidated metadata
    assert dataset[name].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(bits(dataset[name].values), bits(states))


@pytest.mark.parametrize("checksummed", [True, False], ids=["checksummed", "legacy"])
@pytest.mark.parametrize("dtype", WIDTHS)
def test_shards_are_the_bytes_zarr_python_writes(tmp_path, dtype, checksummed):
    """Same commits, same metadata: the direct writer and zarr-python leave identical files."""
    codecs = state_compressors() if dtype == "float32" else capture_compressors("float16")
    width = WIDTHS[dtype]
    arrays = {
        how: zarr.create_array(
            tmp_path / how,
            shape=(3, 0, width),
            dtype=dtype,
            chunks=(1, 8, width),
            shards=(1, 32, width),
            compressors=codecs if checksummed else codecs[:1],
            fill_value=float("nan"),
            dimension_names=DIMS,
        )
        for how in ("direct", "zarr")
    }
    states = random_states(dtype, seed=3)
    for start, stop in ends(COMMITS):
        writer = ShardWriter.of(_past_the_end(arrays["direct"], stop), Folder(tmp_path), "direct")
        assert writer is not None and writer.chunk_crc == checksummed
        writer.write(states[:, start:stop], start, stop)
        _past_the_end(arrays["zarr"], stop)[:, start:stop] = states[:, start:stop]
        files = {how: sorted(p.relative_to(tmp_path / how) for p in (tmp_path / how).glob("c/*/*/0")) for how in arrays}
        assert files["direct"] == files["zarr"] and len(files["direct"]) == 3 * -(-stop // 32)
        for path in files["direct"]:
            direct, written_by_zarr = ((tmp_path / how / path).read_bytes() for how in arrays)
            assert direct == written_by_zarr, f"{path} after the commit to {stop}"
        got = zarr.open_array(tmp_path / "direct", mode="r")
        np.testing.assert_array_equal(bits(_past_the_end(got, stop)[...]), bits(states[:, :stop]))


def test_other_layouts_are_left_to_zarr_python(tmp_path):
    def array(name: str, **layout) -> zarr.Array:
        return zarr.create_array(
            tmp_path / name, shape=(2, 64, 32), dtype="float32", fill_value=0.0, dimension_names=DIMS, **layout
        )

    sharded = {"chunks": (1, 8, 32), "compressors": state_compressors()}
    assert ShardWriter.of(array("end", shards=(1, 32, 32), **sharded), Folder(tmp_path), "end") is not None
    index_first = {"shape": (1, 32, 32), "index_location": "start"}
    assert ShardWriter.of(array("start", shards=index_first, **sharded), Folder(tmp_path), "start") is None
    assert ShardWriter.of(array("plain", **sharded), Folder(tmp_path), "plain") is None
    across = array("across", chunks=(2, 8, 32), shards=(2, 32, 32), compressors=state_compressors())
    assert ShardWriter.of(across, Folder(tmp_path), "across") is None
    zstd = [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=4), Crc32cCodec()]
    other_codec = array("zstd", shards=(1, 32, 32), chunks=(1, 8, 32), compressors=zstd)
    assert ShardWriter.of(other_codec, Folder(tmp_path), "zstd") is not None  # any Blosc parameters


def index_of(data: bytes) -> np.ndarray:
    """The (offset, size) rows of a shard's index (4 inner chunks here)."""
    return np.frombuffer(data[-4 - 4 * 16 : -4], dtype="<u8").reshape(4, 2)


def shard_of(name: str, layer: int, shard: int) -> str:
    return f"{MODEL}/{METHOD}/{name}/c/{layer}/{shard}/0"


DAMAGES = {  # where a byte is flipped in a shard: by its bytes and its index, the position
    "chunk body": lambda data, table: int(table[0, 0]) + 20,
    "chunk checksum": lambda data, table: int(table[0, 0] + table[0, 1]) - 2,
    "index entry": lambda data, table: len(data) - 4 - 4 * 16 + 3,
    "index checksum": lambda data, table: len(data) - 2,
}


@pytest.mark.parametrize("shard", [1, 5], ids=["merged shard", "last partial shard"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_byte_flipped_in_a_shard_written_directly_is_corrupt_data(any_store, damage, shard):
    """Shard 1 was written by two commits (its chunks before 51 kept, the one partly filled there merged);
    shard 5 holds 7 rows of its first chunk."""
    states = random_states("float32")
    write_run(any_store, "float32", states, COMMITS)
    key = shard_of(STATES, 1, shard)
    data = bytearray(read_object(any_store, key))
    data[DAMAGES[damage](data, index_of(bytes(data)))] ^= 0x10
    write_object(any_store, key, bytes(data))
    run = Store(any_store.url).run(MODEL, METHOD)
    with pytest.raises(CorruptData, match=rf"run {MODEL}/{METHOD}, layer 1, samples \d+:\d+"):
        run.read_states([0, 1, 2])
    np.testing.assert_array_equal(run.read_states([0, 2]), states[[0, 2]])  # what is intact still reads
    with pytest.raises(ValueError):  # zarr-python's own checks see it too
        open_states(any_store, STATES)[1, shard * 32 : shard * 32 + 8]


def test_a_commit_onto_a_damaged_partly_filled_chunk_is_refused_as_corrupt_data(tmp_path):
    states = random_states("float32")
    store = Store(tmp_path)
    write_run(store, "float32", states, [21])  # the chunk of rows 16:24 holds 5 committed rows
    path = tmp_path / shard_of(STATES, 2, 0)
    data = bytearray(path.read_bytes())
    data[int(index_of(bytes(data))[2, 0]) + 20] ^= 0x10
    path.write_bytes(bytes(data))
    with store.writer(MODEL, METHOD, recipe={"r": 1}, attrs={}, n_layers=3, hidden=32) as writer:
        writer.add(states[:, 21:30], synthetic_labels(21, 9))
        with pytest.raises(CorruptData, match=rf"run {MODEL}/{METHOD}, layer 2, samples 16:24 .*checksum mismatch"):
            writer.commit()
        writer._pending = []
    assert Store(tmp_path).run(MODEL, METHOD).n_samples == 21


@pytest.mark.parametrize("committed", [40, 37], ids=["chunk end", "mid chunk"])
def test_rows_an_interrupted_writer_left_past_the_end_are_dropped_by_the_next_commit(any_store, committed):
    """A kill between a commit's data and its publication leaves shards holding rows past the committed end;
    the next writer's first commit (of 5 rows) keeps none of them."""
    states = random_states("float32")
    write_run(any_store, "float32", states, [committed])
    run = any_store.run(MODEL, METHOD)
    before = read_object(any_store, shard_of(STATES, 1, 1))
    junk = np.full((3, 80 - committed, 32), 7.0, dtype=np.float32)  # a commit's data written, then the kill
    array = _past_the_end(run.group[STATES], 80)
    ShardWriter.of(array, any_store.location, f"{run.key}/{STATES}").write(junk, committed, 80)
    write_run(any_store, "float32", states, [5], first=committed)  # resumed
    data = read_object(any_store, shard_of(STATES, 1, 1))
    table = index_of(data)
    assert table[0, 0] == 0 and table[1, 0] == table[0, 1] and (table[2:] == MISSING).all()  # rows 32:48 only
    if committed == 40:
        assert data[: table[0, 1]] == before[: table[0, 1]]  # the committed whole chunk kept as stored
    assert not any_store.location.exists(shard_of(STATES, 1, 2))  # wholly past the end: removed when resumed
    run = Store(any_store.url).run(MODEL, METHOD)
    stop = committed + 5
    np.testing.assert_array_equal(run.read_states([0, 1, 2]), states[:, :stop])
    np.testing.assert_array_equal(bits(open_states(any_store, STATES)[...]), bits(states[:, :stop]))
    stored = open_states(any_store, STATES)
    np.testing.assert_array_equal(
        bits(_past_the_end(stored, 48)[:, stop:]), bits(np.full((3, 48 - stop, 32), np.nan, "f4"))
    )


def test_a_failed_shard_write_keeps_every_commit_and_the_run_resumes(tmp_path, monkeypatch):
    states = random_states("float32")
    store = Store(tmp_path)
    write_run(store, "float32", states, [30])
    real_set = _FolderStore.set

    async def full_disk(self, key: str, value) -> None:
        if key.endswith(f"/{STATES}/c/2/1/0"):
            raise OSError(errno.ENOSPC, "No space left on device")
        await real_set(self, key, value)

    monkeypatch.setattr(_FolderStore, "set", full_disk)
    writer = store.writer(MODEL, METHOD, recipe={"r": 1}, attrs={}, n_layers=3, hidden=32)
    writer.add(states[:, 30:70], synthetic_labels(30, 40))
    with pytest.raises(StoreNotWritable, match="No space left on device.*the 30 samples committed before are kept"):
        writer.commit()
    writer.close()
    run = Store(tmp_path).run(MODEL, METHOD)
    assert run.n_samples == 30
    np.testing.assert_array_equal(run.read_states([0, 1, 2]), states[:, :30])  # the other shards rewritten: intact
    monkeypatch.setattr(_FolderStore, "set", real_set)
    write_run(store, "float32", states, [40], first=30)
    np.testing.assert_array_equal(Store(tmp_path).run(MODEL, METHOD).read_states([0, 1, 2]), states[:, :70])
    assert not list(Path(tmp_path).rglob("*.partial"))


def test_float16_chunks_are_blosc_blocks_split_into_byte_streams(tmp_path):
    """Each byte of a 16-bit value compressed as a stream of its own (blosc_split.py: smaller, faster to
    decode): every stored frame's header says so (flag 0x10, "not split", clear); the tests above read them."""
    write_run(Store(tmp_path), "float16", random_states("float16"), [40])
    shards = list(tmp_path.glob(f"{MODEL}/{METHOD}/{SITE}/c/*/*/0"))
    assert len(shards) == 3 * 2
    for shard in shards:
        stored = shard.read_bytes()
        index = np.frombuffer(stored[-(16 * 4 + 4) : -4], dtype="<u8").reshape(-1, 2)
        frames = [stored[offset : offset + size] for offset, size in index if offset != MISSING]
        assert frames and all(frame[2] & 0x10 == 0 for frame in frames), shard
