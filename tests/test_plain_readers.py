"""Plain readers (xarray on the run's folder, whatever its ``consolidated`` argument) see exactly the committed
samples: between commits, while a real ingest commits, and after it is killed; never a size that conflicts
between the states and the labels.

Runs here have 8 samples per inner chunk and 32 per shard (conftest); batches of 3 or 13 samples leave the
last inner chunk partly filled at most commits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import xarray as xr

from actstore.store import Store
from conftest import make_questions, write_jsonl

MODES = {"default": {}, "consolidated": {"consolidated": True}, "not consolidated": {"consolidated": False}}


def labels(start: int, n: int) -> dict[str, np.ndarray]:
    return {"sample": np.arange(start, start + n), "subject": np.array([f"s{start}"] * n, dtype=object),
            "answer": np.array(["A"] * n, dtype=object), "prediction": np.array(["B"] * n, dtype=object),
            "correct": np.zeros(n, dtype=bool)}


def open_plain(path, mode: str) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xarray's note when it falls back from consolidated metadata
        return xr.open_zarr(path, **MODES[mode])


def committed_in(ds: xr.Dataset) -> int:
    """The committed count in the attributes that came with the dataset (JSON text, netCDF-safe)."""
    return json.loads(ds.attrs["progress"])["n_committed"]


@pytest.mark.parametrize("mode", MODES)
def test_between_commits_plain_xarray_shows_exactly_the_committed_samples(tmp_path, mode):
    states = np.random.default_rng(0).standard_normal((3, 78, 32), dtype=np.float32)
    path = tmp_path / "tiny" / "0shot"
    with Store(tmp_path).writer("tiny", "0shot", recipe={"r": 1}, attrs={}, n_layers=3, hidden=32) as writer:
        for start in range(0, 78, 13):
            writer.add(states[:, start : start + 13], labels(start, 13))
            writer.commit()
            ds = open_plain(path, mode)
            assert ds.sizes["sample"] == committed_in(ds) == start + 13
            np.testing.assert_array_equal(ds.hidden_states.values, states[:, : start + 13])
            np.testing.assert_array_equal(ds.sample.values, np.arange(start + 13))
            assert ds.subject.values[-1] == f"s{start}"
    if mode != "consolidated":  # a finished run drops its consolidated metadata (run.py)
        assert open_plain(path, mode).sizes["sample"] == 78


def test_plain_xarray_during_and_after_a_killed_ingest(tiny_model, tmp_path):
    """xarray, opened again and again while a real ingest commits batches of 3, shows the samples committed
    as of the attributes it opened with; after kill -9 every way of opening shows the run's committed samples
    and their values."""
    data = write_jsonl(tmp_path / "big.jsonl", [r for seed in range(8) for r in make_questions(seed)])
    store = tmp_path / "store"
    path = store / "tiny-llama" / "1shot"
    proc = subprocess.Popen([sys.executable, "-m", "actstore", "ingest", "--store", str(store), "--model",
                             str(tiny_model), "--dataset", str(data), "--dtype", "float32", "--batch-size", "3",
                             "--methods", "1shot", "--commit-seconds", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: set[int] = set()
    deadline = time.monotonic() + 120
    try:
        while len(seen) < 8 and proc.poll() is None and time.monotonic() < deadline:
            if not (path / "zarr.json").exists() or "recipe" not in (path / "zarr.json").read_text():
                time.sleep(0.05)
                continue
            for mode in ("default", "consolidated"):  # one file each: the sizes and the progress of one commit
                ds = open_plain(path, mode)
                assert ds.sizes["sample"] == committed_in(ds), mode
                assert ds.subject.size == ds.hidden_states.shape[1]
                seen.add(committed_in(ds))
        assert proc.poll() is None, "the ingest ended before it could be killed"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(seen) >= 8, f"too few commits seen: {sorted(seen)}"
    run = Store(store).run("tiny-llama", "1shot")
    n = run.n_samples
    assert n > 0 and not run.complete
    for mode in MODES:
        ds = open_plain(path, mode)
        assert ds.sizes["sample"] == n, mode
        np.testing.assert_array_equal(ds.hidden_states.values, run.read_states(list(range(run.shape[0]))))
        np.testing.assert_array_equal(ds.sample.values, run.labels()["sample"])
