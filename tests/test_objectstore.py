"""A store in an S3 bucket (a real S3 API: moto's server on loopback) behaves as the same store in a folder."""

from __future__ import annotations

import numpy as np
import pytest
import s3fs
import xarray as xr

from actstore.store import CorruptData, RunLocked, Store, StoreError
from actstore.store.location import UnsupportedLocation

N_LAYERS, HIDDEN = 3, 32


def labels(start: int, stop: int) -> dict[str, np.ndarray]:
    ids = np.arange(start, stop)
    return {"sample": ids, "subject": np.array([f"s{i % 3}" for i in ids], dtype=object),
            "answer": np.array(["ABCD"[i % 4] for i in ids], dtype=object),
            "prediction": np.array(["ABCD"[(i // 2) % 4] for i in ids], dtype=object),
            "correct": ids % 4 == (ids // 2) % 4}


def states(start: int, stop: int) -> np.ndarray:
    rng = np.random.default_rng(start)
    return rng.standard_normal((N_LAYERS, stop - start, HIDDEN)).astype(np.float32)


def fill(store: Store, batches: list[tuple[int, int]], method: str = "0shot") -> None:
    """The same run in any store: batches committed one by one (several shards, a partial last one)."""
    with store.writer("m", method, recipe={"r": 1}, attrs={"note": "x"}, n_layers=N_LAYERS, hidden=HIDDEN,
                      commit_seconds=0) as writer:
        for start, stop in batches:
            writer.add(states(start, stop), labels(start, stop))


BATCHES = [(0, 30), (30, 75), (75, 100)]  # 8-sample inner chunks, 32-sample shards (tests/conftest.py)


@pytest.fixture
def pair(tmp_path, bucket) -> tuple[Store, Store]:
    folder, objects = Store(tmp_path / "store"), Store(f"{bucket}/stores/one")
    for store in (folder, objects):
        fill(store, BATCHES)
    return folder, objects


def test_a_bucket_store_reads_as_the_folder_store(pair):
    folder, objects = pair
    a, b = folder.run("m", "0shot"), objects.run("m", "0shot")
    assert [r.key for r in objects.runs()] == ["m/0shot"] and b.n_samples == a.n_samples == 100
    assert b.attrs["note"] == "x" and b.complete and b.access == a.access
    for name, values in a.labels().items():
        np.testing.assert_array_equal(b.labels()[name], values)
    every = list(range(N_LAYERS))
    np.testing.assert_array_equal(b.read_states(every), a.read_states(every))
    np.testing.assert_array_equal(b.read_states([1], 37, 38), a.read_states([1], 37, 38))
    np.testing.assert_array_equal(b.read_rows([0, 2], np.array([99, 3, 50])), a.read_rows([0, 2], np.array([99, 3, 50])))
    assert [(lo, n) for lo, n, _ in b.encoded_states(2, 5, 90)] == [(lo, n) for lo, n, _ in a.encoded_states(2, 5, 90)]
    xr.testing.assert_identical(b.to_xarray().load(), a.to_xarray().load())


def test_plain_xarray_opens_the_bucket(pair, s3_endpoint):
    folder, objects = pair
    plain = xr.open_zarr(f"{objects.url}", group="m/0shot", storage_options={"endpoint_url": s3_endpoint})
    np.testing.assert_array_equal(plain["hidden_states"].values, folder.run("m", "0shot").read_states([0, 1, 2]))
    np.testing.assert_array_equal(plain["subject"].values, folder.run("m", "0shot").labels()["subject"])


def test_appending_resumes_and_a_different_recipe_is_refused(bucket):
    store = Store(f"{bucket}/s")
    fill(store, BATCHES[:2])
    fill(store, BATCHES[2:])
    whole = Store(f"{bucket}/whole")
    fill(whole, BATCHES)
    np.testing.assert_array_equal(store.run("m", "0shot").read_states([0, 1, 2]),
                                  whole.run("m", "0shot").read_states([0, 1, 2]))
    with pytest.raises(Exception, match="different recipe"):
        store.writer("m", "0shot", recipe={"r": 2}, attrs={}, n_layers=N_LAYERS, hidden=HIDDEN)


def test_a_second_writer_is_refused(bucket):
    store = Store(f"{bucket}/s")
    lock = store.lock_run("m", "0shot")
    try:
        with pytest.raises(RunLocked):
            store.lock_run("m", "0shot")
    finally:
        lock.release()
    store.lock_run("m", "0shot").release()


def test_a_corrupted_object_is_data_loss(pair):
    _, objects = pair
    fs = s3fs.S3FileSystem()
    shard = f"{objects.url.removeprefix('s3://')}/m/0shot/hidden_states/c/1/1/0"
    data = bytearray(fs.cat_file(shard))
    data[40] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    fresh = Store(objects.url).run("m", "0shot")
    with pytest.raises(CorruptData, match=r"layer 1, samples 32:40 .*hidden_states/c/1/1/0"):
        fresh.read_states([1], 32, 34)
    np.testing.assert_array_equal(fresh.read_states([0], 32, 34), states(30, 75)[:1, 2:4])  # the rest reads on


@pytest.mark.parametrize("url", ["gs://bucket/x", "s3:/bucket", "s3://", "ftp://h/x"])
def test_unknown_schemes_are_refused(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsupportedLocation):
        Store(url)
    assert list(tmp_path.iterdir()) == []  # nothing made locally under the URL's name


def test_a_store_at_the_top_of_a_bucket(bucket):
    store = Store(bucket)
    lock = store.lock_run("m", "0shot")  # the lease is taken first, as ingest does, at the bucket's top level
    with store.writing():
        fill(store, BATCHES[:1], method="other")
    lock.release()
    assert [r.key for r in Store(bucket).runs()] == ["m/other"]


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf"])
def test_a_bad_lease_length_is_refused(bucket, monkeypatch, value):
    monkeypatch.setenv("ACTSTORE_LEASE_SECONDS", value)
    with pytest.raises(StoreError, match="ACTSTORE_LEASE_SECONDS"):
        Store(f"{bucket}/s").lock_run("m", "0shot")


def test_overwriting_a_bucket_run_replaces_every_object(bucket):
    store = Store(f"{bucket}/s")
    fill(store, BATCHES)
    with store.writer("m", "0shot", recipe={"r": 2}, attrs={}, n_layers=N_LAYERS, hidden=HIDDEN,
                      overwrite=True, commit_seconds=0) as writer:
        writer.add(states(500, 510), labels(500, 510))
    run = Store(f"{bucket}/s").run("m", "0shot")
    assert run.n_samples == 10 and run.labels()["sample"].tolist() == list(range(500, 510))
    np.testing.assert_array_equal(run.read_states([0, 1, 2]), states(500, 510))
    shards = s3fs.S3FileSystem().find(f"{store.url.removeprefix('s3://')}/m/0shot/hidden_states/c")
    assert len(shards) == N_LAYERS  # one shard a layer: the old run's other shards are gone
