"""Every shard of a run, the last, partly filled one included, is bound to its place (run, layer, shard) by the
shard record of the commit a reader serves: an intact shard copied from another layer or run is corruption in
actstore's reader (from another layer, over a folder and a bucket: test_storage_conformance.py) and DATA_LOSS
in a real server, while a reader of an older commit keeps reading the shard a writer has rewritten since (or
a killed writer left with samples it never committed).

Runs here: 3 layers of 32 floats, 32 samples per shard, 8 per inner chunk (conftest); 80 samples, so shards
0 and 1 are full and shard 2 holds 16 samples (two whole inner chunks).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from actstore.client import ActstoreError, Client
from actstore.server.process import ServerProcess
from actstore.store import CorruptData, Store
from actstore.store.run import STATES, _past_the_end, _rows
from actstore.testing import read_object, shard_key, synthetic_labels, write_object, write_synthetic_run

MODEL, N, LAYER = "tiny", 80, 1
SHARDS = {"full": 1, "partial": 2}


def write_run(store: Store, method: str, n: int = N, batch: int = N) -> np.ndarray:
    """A run of ``n`` samples committed ``batch`` at a time, its values seeded by its name; returns them."""
    return write_synthetic_run(store, MODEL, method, 3, n, 32, batch=batch, seed=sum(map(ord, method)))


def copy_shard(store: Store, source: str, target: str) -> None:
    """Copy one shard file or object over another, as an operator or a sync tool would."""
    write_object(store, target, read_object(store, source))


def swap(store: Store, source: str, shard: int, n: int = N) -> np.ndarray:
    """Runs "0shot" and "donor" of ``n`` samples; ``shard`` of 0shot's LAYER replaced by the same shard of its
    layer 2 or of the donor's LAYER. Returns 0shot's states."""
    states = write_run(store, "0shot", n)
    write_run(store, "donor", n)
    donor = (
        shard_key(MODEL, "0shot", 2, shard) if source == "another layer" else shard_key(MODEL, "donor", LAYER, shard)
    )
    copy_shard(store, donor, shard_key(MODEL, "0shot", LAYER, shard))
    return states


def assert_swap_is_corrupt(store: Store, states: np.ndarray, shard: int, n: int = N) -> None:
    run = store.run(MODEL, "0shot")
    first = shard * 32
    with pytest.raises(
        CorruptData,
        match=rf"run {MODEL}/0shot, layer {LAYER}, samples {first}:{min(first + 32, n)}"
        r".*not the shard committed here",
    ):
        run.read_states([LAYER], first, min(first + 32, n))
    with pytest.raises(CorruptData, match="not the shard committed here"):
        run.read_rows([0, LAYER], np.array([first + 3]))
    np.testing.assert_array_equal(run.read_states([0, 2]), states[[0, 2]])  # the other layers read


@pytest.mark.parametrize("which", SHARDS)
def test_an_intact_shard_swapped_from_another_run_is_corrupt_data(tmp_path, which):
    """From another layer of the same run: test_storage_conformance.py, over a folder and a bucket."""
    store = Store(tmp_path)
    states = swap(store, "another run", SHARDS[which])
    assert_swap_is_corrupt(store, states, SHARDS[which])


@pytest.mark.parametrize("source", ["another layer", "another run"])
def test_a_swapped_partial_shard_holding_less_than_one_inner_chunk_is_corrupt_data(tmp_path, source):
    """68 samples: shard 2 holds 4, no whole inner chunk, so no index entry of it is the same in every later
    version; the record's CRC of those 4 rows' values binds it."""
    store = Store(tmp_path)
    states = swap(store, source, 2, n=68)
    assert_swap_is_corrupt(store, states, 2, n=68)
    assert store.run(MODEL, "0shot").attrs["shard_record"]["partial"]["whole_chunks"] == 0


def test_the_server_answers_data_loss_for_a_swapped_partial_shard(tmp_path):
    """The main job's case: a run shorter than one shard, whose only shard is the partly filled one."""
    root = tmp_path / "store"
    store = Store(root)
    states = write_run(store, "0shot", n=20)  # one shard, 20 of its 32 samples
    write_run(store, "1shot", n=20)
    write_run(store, "donor", n=20)
    copy_shard(store, shard_key(MODEL, "0shot", 2, 0), shard_key(MODEL, "0shot", LAYER, 0))  # from another layer
    copy_shard(store, shard_key(MODEL, "donor", LAYER, 0), shard_key(MODEL, "1shot", LAYER, 0))  # from another run
    with ServerProcess(root, tmp_path / "server.log") as server, Client(server.address) as client:
        for method in ("0shot", "1shot"):
            for samples in (slice(0, 20), slice(5, 6)):
                with pytest.raises(ActstoreError) as caught:
                    client.hidden_states(MODEL, method, layers=LAYER, samples=samples)
                assert caught.value.code == grpc.StatusCode.DATA_LOSS, caught.value
                assert f"run {MODEL}/{method}, layer {LAYER}" in caught.value.message
                assert "not the shard committed here" in caught.value.message
        np.testing.assert_array_equal(client.hidden_states(MODEL, "0shot", layers=0).values[0], states[0])


def test_a_reader_of_an_older_commit_reads_the_partial_shard_rewritten_since(any_store):
    """The partial shard's record changes at every commit; a Run opened before keeps serving its samples."""
    states = np.random.default_rng(1).standard_normal((3, 100, 32), dtype=np.float32)
    with any_store.writer(MODEL, "0shot", recipe={"r": 1}, attrs={}, n_layers=3, hidden=32) as writer:
        writer.add(states[:, :44], synthetic_labels(0, 44))  # shard 1: one whole chunk and 4 samples of the next
        writer.commit()
        old = any_store.run(MODEL, "0shot")
        np.testing.assert_array_equal(old.read_states([0, 1, 2]), states[:, :44])  # its indexes now cached
        for start, stop in ((44, 52), (52, 70), (70, 100)):  # fills a chunk, then shard 1, then into shard 3
            writer.add(states[:, start:stop], synthetic_labels(start, stop - start))
            writer.commit()
            np.testing.assert_array_equal(old.read_states([0, 1, 2]), states[:, :44])
            np.testing.assert_array_equal(old.read_rows([1], np.array([43, 40, 2])), states[1:2, [43, 40, 2]])
            assert sum(count for _, count, _ in old.encoded_states(1, 0, 44)) == 44
    np.testing.assert_array_equal(any_store.run(MODEL, "0shot").read_states([0, 1, 2]), states)


def test_samples_a_killed_writer_wrote_but_never_committed_do_not_make_the_partial_shard_corrupt(tmp_path):
    """A kill between a commit's data and its publication leaves the partial shard rewritten, its record not:
    the committed samples still read, from the server's reader as from a fresh one."""
    store = Store(tmp_path)
    states = np.random.default_rng(2).standard_normal((3, 60, 32), dtype=np.float32)
    writer = store.writer(MODEL, "0shot", recipe={"r": 1}, attrs={}, n_layers=3, hidden=32)
    writer.add(states[:, :44], synthetic_labels(0, 44))
    writer.commit()
    array = writer.run.group[STATES]  # what the next commit does before it publishes, then the kill
    _past_the_end(array, 60)[_rows(array.metadata, 44, 60)] = states[:, 44:60]
    writer._lock.release()
    run = Store(tmp_path).run(MODEL, "0shot")
    assert run.n_samples == 44
    np.testing.assert_array_equal(run.read_states([0, 1, 2]), states[:, :44])


def _read_on_a_worker(root: str, layer: int, positions: list[int]) -> np.ndarray:
    return Store(root).run(MODEL, "0shot").read_rows([layer], np.array(positions))


def test_a_dask_worker_reading_a_swapped_partial_shard_gets_corrupt_data(tmp_path):
    """What analyses do: a worker process opens the run and reads rows (Run.read_rows) of one layer."""
    from distributed import Client as DaskClient
    from distributed import LocalCluster

    store = Store(tmp_path)
    states = swap(store, "another layer", SHARDS["partial"])
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        DaskClient(cluster) as client,
    ):
        with pytest.raises(CorruptData, match=rf"run {MODEL}/0shot, layer {LAYER}.*not the shard committed here"):
            client.submit(_read_on_a_worker, str(tmp_path), LAYER, [70, 3]).result()
        intact = client.submit(_read_on_a_worker, str(tmp_path), 0, [70, 3]).result()
    np.testing.assert_array_equal(intact, states[:1, [70, 3]])
