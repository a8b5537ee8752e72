"""Plain xarray, without actstore, sees exactly the committed samples of a run being written."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from actstore.store import CorruptData, Store

HIDDEN = 32  # inner chunks hold 8 samples here (conftest's small_chunks)


def _batch(start: int, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ids = np.arange(start, start + n)
    states = (ids[None, :, None] * 10 + np.arange(3)[:, None, None] + np.zeros(HIDDEN)).astype(np.float32)
    text = np.array([str(i) for i in ids], dtype=object)
    return states, {
        "sample": ids,
        "subject": text,
        "answer": text,
        "prediction": text,
        "correct": np.ones(n, dtype=bool),
    }


def _plain(path, **kwargs) -> xr.Dataset:
    """Run m/0shot as plain xarray opens its folder: with its consolidated metadata, or each array's own."""
    return xr.open_zarr(Path(path) / "m" / "0shot", **kwargs)


def test_plain_xarray_sees_exactly_the_committed_samples_while_a_writer_commits_by_time(tmp_path):
    """A writer's timed commits stop at whole inner chunks and keep the rest buffered: the view a plain reader
    gets (the run group's consolidated metadata, which is what a kill leaves too) is every committed sample,
    no fewer and no unfilled row."""
    store = Store(tmp_path / "store")
    writer = store.writer("m", "0shot", recipe={"r": 1}, attrs={}, n_layers=3, hidden=HIDDEN, commit_seconds=3600)
    start, shown = 0, []
    for n in (5, 5, 7, 3, 11, 2, 9):
        writer.add(*_batch(start, n))
        start += n
        writer.commit(whole_chunks=True)
        committed = Store(store.url).run("m", "0shot").n_samples
        # the group's consolidated metadata: every commit; each array's own: the session's start, consistently
        for kwargs, expected in (({}, committed), ({"consolidated": False}, 0)):
            ds = _plain(tmp_path / "store", **kwargs)
            assert ds.sizes["sample"] == expected, (kwargs, start, committed, ds.sizes["sample"])
            ids = ds.sample.values
            np.testing.assert_array_equal(ds.hidden_states.values[:, :, 0], ids[None, :] * 10 + np.arange(3)[:, None])
        shown.append(committed)
    assert shown == [0, 8, 16, 16, 24, 32, 40], shown  # whole chunks committed, the rest still buffered
    writer.close()
    for kwargs in ({}, {"consolidated": False}):
        assert _plain(tmp_path / "store", **kwargs).sizes["sample"] == start == 42


def test_a_finished_run_opens_in_plain_xarray_without_a_warning_and_without_its_analysis_caches(tmp_path):
    """A finished run keeps its consolidated metadata (arrays only): xarray, opening the run's folder as its
    store, warns of nothing, and a datatree of it does not list the ``derived/`` entries analyses add."""
    store = Store(tmp_path / "store")
    with store.writer("m", "0shot", recipe={"r": 1}, attrs={}, n_layers=3, hidden=HIDDEN) as writer:
        writer.add(*_batch(0, 13))
    store.run("m", "0shot").save_derived("density", "abc", {"values": np.arange(3.0)}, {"maxk": 5})
    run_folder = tmp_path / "store" / "m" / "0shot"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(run_folder)
        tree = xr.open_datatree(run_folder, engine="zarr")
    assert ds.sizes["sample"] == 13  # the last, partly filled inner chunk shown once the writer is done
    np.testing.assert_array_equal(ds.hidden_states.values[:, :, 0], np.arange(13)[None, :] * 10 + np.arange(3)[:, None])
    assert list(tree.children) == []
    assert store.run("m", "0shot").load_derived("density", "abc")[1]["maxk"] == 5


def test_xarray_engine_actstore_gives_shard_chunks_loaded_labels_and_checked_reads(tmp_path):
    """``engine="actstore"``: dask chunks of one shard (not one 8-sample inner chunk), labels that groupby
    takes as they are, no warning, and the fast reader's checks: an intact shard copied over another layer's
    is CorruptData, where plain zarr would serve the other layer's numbers."""
    store = Store(tmp_path / "store")
    with store.writer("m", "0shot", recipe={"r": 1}, attrs={}, n_layers=3, hidden=HIDDEN) as writer:
        writer.add(*_batch(0, 70))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_dataset(tmp_path / "store", engine="actstore", group="m/0shot", chunks={})
    assert ds.hidden_states.chunks == ((1, 1, 1), (32, 32, 6), (HIDDEN,))
    assert isinstance(ds.subject.data, np.ndarray)
    assert ds.groupby("subject").mean().sizes["subject"] == 70
    np.testing.assert_array_equal(ds.hidden_states.values[:, :, 0], np.arange(70)[None, :] * 10 + np.arange(3)[:, None])
    lazy = xr.open_dataset(tmp_path / "store", engine="actstore", group="m/0shot")
    np.testing.assert_array_equal(lazy.hidden_states[2, 40:3:-7, 5].values, np.arange(40, 3, -7) * 10 + 2)
    shards = tmp_path / "store" / "m" / "0shot" / "hidden_states" / "c"
    (shards / "1" / "0" / "0").write_bytes((shards / "0" / "0" / "0").read_bytes())
    with pytest.raises(CorruptData, match="layer 1"):
        xr.open_dataset(tmp_path / "store", engine="actstore", group="m/0shot").hidden_states[1].values
    plain = xr.open_zarr(tmp_path / "store" / "m" / "0shot").hidden_states[1, :32, 0].values
    np.testing.assert_array_equal(plain, np.arange(32) * 10)  # layer 0's numbers, unnoticed
