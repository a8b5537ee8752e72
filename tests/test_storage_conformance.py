"""What a store does wherever it is kept: every test here runs over a folder and over a bucket (moto's S3 server
on loopback) through the ``any_store`` fixture (tests/conftest.py), so that a location kind that falls behind
fails here by name. What only a bucket does (its lease expiring, endpoint errors, plain xarray given the
endpoint) is tested in test_objectstore.py and test_lease.py.

Runs: 3 layers of 32 floats, 8 samples per inner chunk and 32 per shard (conftest), 100 samples unless said.
Each check reads through a Store opened anew, so that nothing the writing Store cached answers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from actstore.cli import main
from actstore.store import CorruptData, InvalidName, RecipeMismatch, RunLocked, RunNotFound, Store
from actstore.store.errors import DamagedRun
from actstore.store.location import MAX_METADATA_BYTES, Lock
from actstore.testing import read_object, shard_key, synthetic_labels, write_object, write_synthetic_run

MODEL, METHOD, LAYER = "m", "0shot", 1
SIZES = {"n_layers": 3, "hidden": 32}


def fresh(store: Store) -> Store:
    return Store(store.url)


def bits(values: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns: equal only if stored and read back bit for bit."""
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


def random_states(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((SIZES["n_layers"], n, SIZES["hidden"]), dtype=np.float32)


def test_a_run_is_created_and_listed(any_store):
    write_synthetic_run(any_store, MODEL, METHOD)
    write_synthetic_run(any_store, MODEL, "1shot", n_samples=10)
    store = fresh(any_store)
    assert store.exists() and [r.key for r in store.runs()] == ["m/0shot", "m/1shot"]
    assert store.has_run(MODEL, METHOD) and not store.has_run(MODEL, "2shot")
    run = store.run(MODEL, METHOD)
    assert run.shape == (3, 100, 32) and run.complete and run.access["visibility"] == "public"
    with pytest.raises(RunNotFound, match=r"no run m/2shot .*\(runs: m/0shot, m/1shot\)"):
        store.run(MODEL, "2shot")


def test_states_written_in_several_commits_read_back_bit_for_bit(any_store):
    states = write_synthetic_run(any_store, MODEL, METHOD, batch=30)  # commits end inside shards 0, 1 and 2
    run = fresh(any_store).run(MODEL, METHOD)
    np.testing.assert_array_equal(bits(run.read_states([0, 1, 2])), bits(states))
    np.testing.assert_array_equal(bits(run.read_states([2, 0], 29, 61)), bits(states[[2, 0], 29:61]))
    rows = np.array([99, 3, 50, 31])
    np.testing.assert_array_equal(bits(run.read_rows([LAYER], rows)), bits(states[LAYER : LAYER + 1, rows]))
    dataset = run.to_xarray()
    np.testing.assert_array_equal(bits(dataset.hidden_states.values), bits(states))
    assert dataset.hidden_states.dims == ("layer", "sample", "hidden")
    for name, values in synthetic_labels(0, 100).items():
        np.testing.assert_array_equal(run.labels()[name], values)
        np.testing.assert_array_equal(dataset[name].values, values)


def test_a_run_begun_and_abandoned_before_its_start_leaves_nothing_and_keeps_others_out_meanwhile(any_store):
    """Ingest begins a run before loading its model: the run is locked at once, and if the model never loads,
    no run appears."""
    write_synthetic_run(any_store, MODEL, "1shot", n_samples=10)
    with any_store.begin_run(MODEL, METHOD, recipe={"r": 1}) as begun:
        with pytest.raises(RunLocked):
            fresh(any_store).begin_run(MODEL, METHOD, recipe={"r": 1})
        with pytest.raises(RuntimeError, match="start"):
            begun.add(random_states(4, seed=0), synthetic_labels(0, 4))
    store = fresh(any_store)
    assert [r.key for r in store.runs()] == ["m/1shot"] and not store.has_run(MODEL, METHOD)


def test_a_session_start_is_one_publish_that_keeps_the_provenance_of_a_resumed_run(any_store):
    with any_store.begin_run(MODEL, METHOD, recipe={"r": 1}) as writer:
        writer.start(provenance={"created": "first"}, attrs={"batch_size": 8}, planned=10, history={"n": 1}, **SIZES)
        writer.add(random_states(4, seed=0), synthetic_labels(0, 4))
    with fresh(any_store).begin_run(MODEL, METHOD, recipe={"r": 1}) as writer:
        assert writer.n_committed == 4 and writer.stored_attrs["batch_size"] == 8
        writer.start(provenance={"created": "second"}, attrs={"batch_size": 2}, planned=6, history={"n": 2}, **SIZES)
        writer.add(random_states(2, seed=1), synthetic_labels(4, 2))
    attrs = fresh(any_store).run(MODEL, METHOD).attrs
    assert attrs["created"] == "first" and attrs["batch_size"] == 2 and attrs["history"] == [{"n": 1}, {"n": 2}]
    assert attrs["progress"]["n_committed"] == attrs["progress"]["n_planned"] == 6 and attrs["progress"]["complete"]


class Killed(BaseException):
    """The writer's process dying, where its lock is next checked."""


@dataclass
class DyingLock:
    """The run's lock, held by a writer whose process dies (once ``dead``) at its next lock check: the one
    before a commit is published, after the commit's data is written past the run's end."""

    lock: Lock
    dead: bool = False

    def check(self) -> None:
        if self.dead:
            raise Killed
        self.lock.check()

    def release(self) -> None:
        self.lock.release()


def test_a_new_writer_resumes_an_abandoned_one_keeping_its_commits_and_nothing_more(any_store):
    states = random_states(100, seed=0)
    writer = any_store.begin_run(MODEL, METHOD, recipe={"r": 1}, commit_seconds=3600)
    writer._lock = lock = DyingLock(writer._lock)  # a lock that can be made to fail, as a kill would
    writer.start(provenance={}, **SIZES)
    writer.add(states[:, :40], synthetic_labels(0, 40))
    writer.commit()
    lock.dead = True
    writer.add(states[:, 40:], synthetic_labels(40, 60))
    with pytest.raises(Killed):
        writer.commit()  # shards 1 to 3 rewritten or written past the end, nothing published; never closed
    lock.release()  # what the kernel does for a dead process, and an expired lease for a bucket's writer
    np.testing.assert_array_equal(
        bits(fresh(any_store).run(MODEL, METHOD).read_states([0, 1, 2])), bits(states[:, :40])
    )

    more = random_states(30, seed=1)
    with fresh(any_store).writer(MODEL, METHOD, recipe={"r": 1}, attrs={}, **SIZES) as writer:
        writer.add(more, synthetic_labels(40, 30))
    run = fresh(any_store).run(MODEL, METHOD)
    expected = np.concatenate([states[:, :40], more], axis=1)
    assert run.n_samples == 70 and run.labels()["sample"].tolist() == list(range(70))
    np.testing.assert_array_equal(bits(run.read_states([0, 1, 2])), bits(expected))
    np.testing.assert_array_equal(bits(run.to_xarray().hidden_states.values), bits(expected))
    shards = {key.split("/")[-2] for key in any_store.location.keys_below(f"{MODEL}/{METHOD}/hidden_states/c/0")}
    assert shards == {"0", "1", "2"}  # the dead writer's shard 3 (samples 96:100) is gone


def test_a_flipped_byte_in_a_shard_is_corrupt_data_naming_the_layer(any_store):
    states = write_synthetic_run(any_store, MODEL, METHOD)
    key = shard_key(MODEL, METHOD, LAYER, 1)
    damaged = bytearray(read_object(any_store, key))
    damaged[40] ^= 0x10  # inside the shard's first inner chunk (samples 32:40), its index at the end
    write_object(any_store, key, bytes(damaged))
    run = fresh(any_store).run(MODEL, METHOD)
    with pytest.raises(CorruptData, match=rf"run {MODEL}/{METHOD}, layer {LAYER}, samples 32:40\b"):
        run.read_states([LAYER], 32, 64)
    np.testing.assert_array_equal(bits(run.read_states([0, 2], 32, 64)), bits(states[[0, 2], 32:64]))
    np.testing.assert_array_equal(bits(run.read_states([LAYER], 40, 100)), bits(states[LAYER : LAYER + 1, 40:]))


@pytest.mark.parametrize("shard", [1, 2], ids=["full", "partial"])
def test_an_intact_shard_copied_from_another_layer_is_corrupt_data(any_store, shard):
    """Its bytes pass every checksum; the shard record of the commit read does not match them. 80 samples:
    shard 1 is full, shard 2 holds 16."""
    states = write_synthetic_run(any_store, MODEL, METHOD, n_samples=80)
    donor = read_object(any_store, shard_key(MODEL, METHOD, 2, shard))
    write_object(any_store, shard_key(MODEL, METHOD, LAYER, shard), donor)
    run = fresh(any_store).run(MODEL, METHOD)
    first, stop = shard * 32, min(shard * 32 + 32, 80)
    with pytest.raises(
        CorruptData,
        match=rf"run {MODEL}/{METHOD}, layer {LAYER}, samples {first}:{stop}\b.*"
        r"not the shard committed here",
    ):
        run.read_states([LAYER], first, stop)
    np.testing.assert_array_equal(bits(run.read_states([0, 2])), bits(states[[0, 2]]))


def test_a_second_writer_is_refused_while_one_holds_the_run(any_store):
    with any_store.writer(MODEL, METHOD, recipe={"r": 1}, attrs={}, **SIZES) as writer:
        writer.add(random_states(10, seed=0), synthetic_labels(0, 10))
        other = fresh(any_store)
        for second in (
            lambda: other.writer(MODEL, METHOD, recipe={"r": 1}, attrs={}, **SIZES),
            lambda: other.begin_run(MODEL, METHOD, recipe={"r": 1}),
            lambda: other.set_access(MODEL, METHOD, {"visibility": "private"}),
        ):
            with pytest.raises(RunLocked, match=rf"run {MODEL}/{METHOD} is being written"):
                second()
    fresh(any_store).begin_run(MODEL, METHOD, recipe={"r": 1}).close()  # free once the first writer closed
    run = fresh(any_store).run(MODEL, METHOD)
    assert run.n_samples == 10 and run.access["visibility"] == "public"


def truncate(store: Store, run: str) -> None:
    data = read_object(store, f"{run}/zarr.json")
    write_object(store, f"{run}/zarr.json", data[: len(data) // 2])


def remove_states(store: Store, run: str) -> None:
    store.location.clear(f"{run}/hidden_states")


def oversize(store: Store, run: str) -> None:
    """Still valid JSON: whitespace after the document, past the size the store reads."""
    write_object(store, f"{run}/zarr.json", read_object(store, f"{run}/zarr.json") + b" " * MAX_METADATA_BYTES)


DAMAGES = {
    "truncated zarr.json": (truncate, "its metadata cannot be read"),
    "no states array": (remove_states, "its array 'hidden_states' is missing"),
    "oversized zarr.json": (oversize, r"metadata (file|object) .*above"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_run_leaves_the_other_runs_listed(any_store, damage, capsys):
    for method in ("a", "damaged", "z"):
        write_synthetic_run(any_store, MODEL, method)
    harm, why = DAMAGES[damage]
    harm(any_store, f"{MODEL}/damaged")
    store = fresh(any_store)
    good, damaged = store.scan()
    assert [r.method for r in good] == ["a", "z"] and len(damaged) == 1
    with pytest.raises(DamagedRun, match=rf"run {MODEL}/damaged in store {store.url} is damaged: .*{why}"):
        store.run(MODEL, "damaged")
    assert store.has_run(MODEL, "damaged") and store.run(MODEL, "z").read_states([0]).shape == (1, 100, 32)
    assert main(["ls", "--store", store.url]) == 0
    shown = capsys.readouterr()
    assert f"{MODEL}/a" in shown.out and f"{MODEL}/z" in shown.out and f"run {MODEL}/damaged " in shown.err


def test_names_that_could_escape_the_root_are_refused_before_anything_is_written(any_store):
    for bad in ("..", "a/b", "../x", ".hidden", ""):
        for call in (
            lambda: any_store.writer(bad, METHOD, recipe={"r": 1}, attrs={}, **SIZES),
            lambda: any_store.writer(MODEL, bad, recipe={"r": 1}, attrs={}, **SIZES),
            lambda: any_store.begin_run(MODEL, bad, recipe={"r": 1}),
            lambda: any_store.run(bad, METHOD),
        ):
            with pytest.raises(InvalidName):
                call()
    assert not any_store.exists() and any_store.location.keys_below("") == []


def test_a_writer_of_another_recipe_is_refused_and_the_run_left_as_it_was(any_store):
    states = write_synthetic_run(any_store, MODEL, METHOD, seed=0)
    with pytest.raises(RecipeMismatch, match=rf"run {MODEL}/{METHOD} already exists with a different recipe"):
        write_synthetic_run(any_store, MODEL, METHOD, seed=1)
    fresh(any_store).begin_run(MODEL, METHOD, recipe={"synthetic": 0}).close()  # the refused writer let go of it
    np.testing.assert_array_equal(bits(fresh(any_store).run(MODEL, METHOD).read_states([0, 1, 2])), bits(states))
