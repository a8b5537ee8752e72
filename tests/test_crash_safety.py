"""Kill -9 at any point, rerun: the run resumes and ends identical to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from actstore import testing
from actstore.cli import main
from actstore.store import RunLocked, Store
from actstore.testing import make_questions, write_jsonl

RUN = "tiny-llama/1shot"


def committed(store) -> int:
    meta = store / "tiny-llama" / "1shot" / "zarr.json"
    try:
        attrs = json.loads(meta.read_text())["attributes"]
        return json.loads(attrs["progress"])["n_committed"] if "recipe" in attrs else 0  # JSON text (netCDF-safe)
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def ingest_args(store, model, data, *extra):
    """One method in batches of 3 (several commits), ``extra`` after."""
    return testing.ingest_args(store, model, data, "--batch-size", "3", "--methods", "1shot", *extra)


def test_kill_then_resume_equals_uninterrupted(tiny_model, tmp_path):
    rows = [r for seed in range(8) for r in make_questions(seed)]  # 8 copies: ~300 queries
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    killed, clean = tmp_path / "killed", tmp_path / "clean"

    proc = subprocess.Popen(
        [sys.executable, "-m", "actstore", *ingest_args(killed, tiny_model, data, "--commit-seconds", "0")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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


def test_a_label_longer_than_a_run_stores_is_refused_before_its_batch_is_written(tmp_path):
    from actstore.store.run import MAX_LABEL_CHARS, LabelTooLong

    store = Store(tmp_path)
    states = np.ones((2, 3, 32), dtype=np.float32)
    ok = {
        "sample": np.arange(3),
        "subject": np.array(["anatomy"] * 3, dtype=object),
        "answer": np.array(["A"] * 3, dtype=object),
        "prediction": np.array(["B"] * 3, dtype=object),
        "correct": np.zeros(3, dtype=bool),
    }
    with store.writer("m", "0shot", recipe={"r": 1}, attrs={}, n_layers=2, hidden=32) as writer:
        writer.add(states, ok)
        writer.commit()
        for name in ("subject", "answer", "prediction"):
            bad = {
                **ok,
                "sample": np.arange(3, 6),
                name: np.array(["x", "y" * (MAX_LABEL_CHARS + 1), "z"], dtype=object),
            }
            with pytest.raises(LabelTooLong, match=f"the {name} of sample 4 has 257 characters, above the 256"):
                writer.add(states, bad)
        writer.add(states, {**ok, "subject": np.array(["y" * MAX_LABEL_CHARS] * 3, dtype=object)})  # at the limit
    run = store.run("m", "0shot")
    assert run.n_samples == 6 and run.labels()["subject"][3] == "y" * MAX_LABEL_CHARS


def test_ingest_refuses_a_65536_character_subject_in_one_line_before_the_model_runs(tiny_model, tmp_path, capsys):
    """The issue's case: a subject of 65,536 characters is refused as the dataset is read, in one line, and
    nothing is stored (it would otherwise reach the model's attention as a prompt of ~65,000 tokens)."""
    rows = [{**r, "topic": "x" * 65536} if r["topic"] == "anatomy" else r for r in make_questions()]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    store = tmp_path / "store"
    assert main(ingest_args(store, tiny_model, data)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "a subject of 65,536 characters, above the 256 a run stores" in errors[0], errors
    assert not (store / "tiny-llama").exists()
