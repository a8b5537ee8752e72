"""Plain xarray, without actstore, sees exactly the committed samples of a run being written."""

from __future__ import annotations

import numpy as np
import xarray as xr

from actstore.store import Store

HIDDEN = 32  # inner chunks hold 8 samples here (conftest's small_chunks)


def _batch(start: int, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ids = np.arange(start, start + n)
    states = (ids[None, :, None] * 10 + np.arange(3)[:, None, None] + np.zeros(HIDDEN)).astype(np.float32)
    text = np.array([str(i) for i in ids], dtype=object)
    return states, {"sample": ids, "subject": text, "answer": text, "prediction": text,
                    "correct": np.ones(n, dtype=bool)}


def _plain(path, **kwargs) -> xr.Dataset:
    return xr.open_zarr(path, group="m/0shot", **kwargs)


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
        ds = _plain(tmp_path / "store")
        assert ds.sizes["sample"] == committed, (start, committed, ds.sizes["sample"])
        ids = ds.sample.values
        np.testing.assert_array_equal(ds.hidden_states.values[:, :, 0], ids[None, :] * 10 + np.arange(3)[:, None])
        shown.append(committed)
    assert shown == [0, 8, 16, 16, 24, 32, 40], shown  # whole chunks committed, the rest still buffered
    writer.close()
    for kwargs in ({}, {"consolidated": False}):
        assert _plain(tmp_path / "store", **kwargs).sizes["sample"] == start == 42
