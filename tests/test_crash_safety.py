"""Kill -9 at any point, rerun: the run resumes and ends identical to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from actstore.cli import main
from actstore.store import RunLocked, Store
from conftest import make_questions, write_jsonl

RUN = "tiny-llama/1shot"


def committed(store) -> int:
    meta = store / "tiny-llama" / "1shot" / "zarr.json"
    try:
        attrs = json.loads(meta.read_text())["attributes"]
        return json.loads(attrs["progress"])["n_committed"] if "recipe" in attrs else 0  # JSON text (netCDF-safe)
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def ingest_args(store, model, data, *extra):
    return ["ingest", "--store", str(store), "--model", str(model), "--dataset", str(data), "--dtype", "float32",
            "--batch-size", "3", "--methods", "1shot", *extra]


def test_kill_then_resume_equals_uninterrupted(tiny_model, tmp_path):
    rows = [r for seed in range(8) for r in make_questions(seed)]  # 8 copies: ~300 queries
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    killed, clean = tmp_path / "killed", tmp_path / "clean"

    proc = subprocess.Popen([sys.executable, "-m", "actstore", *ingest_args(killed, tiny_model, data,
                                                                              "--commit-seconds", "0")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while committed(killed) < 30 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the ingest ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    run = Store(killed).run(*RUN.split("/"))
    n = run.n_samples
    assert 0 < n < 300 and n % 3 == 0  # whole batches only
    assert not run.complete
    assert not np.isnan(run.hidden_states[:, :n]).any()

    assert main(ingest_args(killed, tiny_model, data)) == 0  # resume
    assert main(ingest_args(clean, tiny_model, data)) == 0  # uninterrupted
    resumed, reference = Store(killed).run(*RUN.split("/")), Store(clean).run(*RUN.split("/"))
    assert resumed.complete and resumed.n_samples == reference.n_samples > n
    np.testing.assert_array_equal(resumed.hidden_states[:], reference.hidden_states[:])
    for name, values in reference.labels().items():
        np.testing.assert_array_equal(resumed.labels()[name], values)
    assert not list(killed.rglob("*.partial"))


def test_second_concurrent_writer_is_refused(ingest_cli, capsys):
    assert ingest_cli("--methods", "1shot", "--limit", "6") == 0
    store = Store(ingest_cli.store)
    recipe = store.run(*RUN.split("/")).attrs["recipe"]
    with store.writer(*RUN.split("/"), recipe=recipe, attrs={}, n_layers=4, hidden=32):
        assert ingest_cli("--methods", "1shot", "--limit", "12") == 1
        assert "being written by another process" in capsys.readouterr().err
        with pytest.raises(RunLocked):
            store.writer(*RUN.split("/"), recipe=recipe, attrs={}, n_layers=4, hidden=32)
    assert store.run(*RUN.split("/")).n_samples == 6
