"""What only a store in an S3 bucket does (a real S3 API: moto's server on loopback): plain xarray reads it given
the endpoint, a store may sit at a bucket's top level, the lease length comes from the environment, an
overwrite deletes the old run's objects, and unknown URL schemes are refused. What every location kind does
alike (reading back, resuming, corruption, locking, damaged runs) is tested over a folder and a bucket in
test_storage_conformance.py."""

from __future__ import annotations

import numpy as np
import pytest
import s3fs
import xarray as xr

from actstore.store import Store, StoreError
from actstore.store.location import UnsupportedLocation
from actstore.testing import synthetic_labels, write_synthetic_run


def test_plain_xarray_opens_the_bucket(bucket, s3_endpoint):
    store = Store(f"{bucket}/store")
    states = write_synthetic_run(store, "m", "0shot", batch=30)
    plain = xr.open_zarr(f"{store.url}/m/0shot", storage_options={"endpoint_url": s3_endpoint})
    np.testing.assert_array_equal(plain["hidden_states"].values, states)
    np.testing.assert_array_equal(plain["subject"].values, synthetic_labels(0, 100)["subject"])


@pytest.mark.parametrize("url", ["gs://bucket/x", "s3:/bucket", "s3://", "ftp://h/x"])
def test_unknown_schemes_are_refused(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsupportedLocation):
        Store(url)
    assert list(tmp_path.iterdir()) == []  # nothing made locally under the URL's name


def test_a_store_at_the_top_of_a_bucket(bucket):
    store = Store(bucket)
    begun = store.begin_run("m", "0shot", recipe={"r": 1})  # the lease first, as ingest takes it, at the top level
    with store.writing():
        write_synthetic_run(store, "m", "other", n_samples=30)
    begun.close()
    assert [r.key for r in Store(bucket).runs()] == ["m/other"]


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf"])
def test_a_bad_lease_length_is_refused(bucket, monkeypatch, value):
    monkeypatch.setenv("ACTSTORE_LEASE_SECONDS", value)
    with pytest.raises(StoreError, match="ACTSTORE_LEASE_SECONDS"):
        Store(f"{bucket}/s").begin_run("m", "0shot", recipe={"r": 1})


def test_overwriting_a_bucket_run_replaces_every_object(bucket):
    store = Store(f"{bucket}/s")
    write_synthetic_run(store, "m", "0shot")
    states = np.random.default_rng(1).standard_normal((3, 10, 32), dtype=np.float32)
    with store.writer("m", "0shot", recipe={"r": 2}, attrs={}, n_layers=3, hidden=32, overwrite=True) as writer:
        writer.add(states, synthetic_labels(500, 10))
    run = Store(f"{bucket}/s").run("m", "0shot")
    assert run.n_samples == 10 and run.labels()["sample"].tolist() == list(range(500, 510))
    np.testing.assert_array_equal(run.read_states([0, 1, 2]), states)
    shards = s3fs.S3FileSystem().find(f"{store.url.removeprefix('s3://')}/m/0shot/hidden_states/c")
    assert len(shards) == 3  # one shard a layer: the old run's other shards are gone
