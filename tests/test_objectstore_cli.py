"""The command line on a store in a bucket (a real S3 API: moto's server on loopback): ``--store s3://...`` works
exactly as a folder for ingest (kill -9 and resume included), ls and plot; an unknown scheme is one error line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import s3fs
from test_crash_safety import RUN, ingest_args

from actstore.analysis.density import PAPER
from actstore.analysis.layers import Mask
from actstore.analysis.scheduler import comparison_outcome, layer_outcome
from actstore.cli import main
from actstore.ingest import pipeline
from actstore.store import Store
from actstore.testing import make_questions, write_jsonl

# The killed ingest's lease lasts this long (not the default minute) so that the test need not wait it out.
LEASE_SECONDS = 2.0
LOCKED = "is being written by another process"


def metadata(run) -> str:
    """The states array's metadata (shape, chunks, shards, codecs), comparable (its fill value is NaN)."""
    return json.dumps(run.hidden_states.metadata.to_dict(), sort_keys=True, default=str)


def assert_same_store(a: Store, b: Store) -> None:
    """The same runs, layout, array metadata (compression), states and labels."""
    assert [r.key for r in a.runs()] == [r.key for r in b.runs()] != []
    assert sorted(a.location.keys_below("")) == sorted(b.location.keys_below(""))
    for run_a, run_b in zip(a.runs(), b.runs()):
        assert run_a.complete and run_b.complete and run_a.n_samples == run_b.n_samples > 0
        assert run_a.attrs["recipe"] == run_b.attrs["recipe"] and run_a.accuracy == run_b.accuracy
        assert metadata(run_a) == metadata(run_b)
        np.testing.assert_array_equal(run_a.hidden_states[:], run_b.hidden_states[:])
        labels_b = run_b.labels()
        for name, values in run_a.labels().items():
            np.testing.assert_array_equal(labels_b[name], values)


def test_ingest_and_ls_on_a_bucket_equal_a_folder(ingest_cli, bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"{bucket}/stores/one"
    assert ingest_cli("--methods", "0shot,2shot", store_path=url) == 0
    assert ingest_cli("--methods", "0shot,2shot") == 0
    assert_same_store(Store(url), Store(ingest_cli.store))
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no local folder named after the URL

    capsys.readouterr()
    assert main(["ls", "--store", url]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[1:]] == ["tiny-llama/0shot", "tiny-llama/2shot"]
    assert all(line.endswith("complete") for line in listed[1:])
    assert main(["ls", "--store", f"{bucket}/elsewhere"]) == 1
    assert capsys.readouterr().err == f"actstore: error: no actstore store at {bucket}/elsewhere\n"


@pytest.mark.parametrize("url", ["gs://x", "s3:/b/x", "s3://"])
@pytest.mark.parametrize(
    "command",
    [["ls"], ["ingest", "--dataset", "nope.jsonl"], ["plot", "--model", "m", "--out", "o"], ["study", "--no-finetune"]],
)
def test_an_unknown_scheme_is_one_error_line_and_writes_nothing(command, url, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--store", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"actstore: error: store {url!r}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def committed_in(url: str) -> int:
    """Samples committed so far by the ingest of RUN into the bucket store ``url``, read from the run's metadata
    object as test_crash_safety.committed reads its file (0 before the first commit): polled while the run is
    being created, which Store.has_run does not survive (the writer clears and rewrites the run's zarr.json)."""
    try:
        attrs = json.loads(s3fs.S3FileSystem().cat_file(f"{url.removeprefix('s3://')}/{RUN}/zarr.json"))["attributes"]
        return json.loads(attrs["progress"])["n_committed"] if "recipe" in attrs else 0
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_a_killed_bucket_ingest_holds_others_off_then_resumes_equal_to_an_uninterrupted_run(
    tiny_model, bucket, tmp_path, monkeypatch, capsys, caplog
):
    rows = [r for seed in range(8) for r in make_questions(seed)]  # 8 copies: ~300 queries
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    url, clean = f"{bucket}/killed", tmp_path / "clean"
    proc = subprocess.Popen(
        [sys.executable, "-m", "actstore", *ingest_args(url, tiny_model, data, "--commit-seconds", "0")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "ACTSTORE_LEASE_SECONDS": str(LEASE_SECONDS)},
    )
    try:
        deadline = time.monotonic() + 120
        while committed_in(url) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the ingest ended before a second one could be tried"

        loaded = []  # models a second ingest loads: none, it is refused first
        model = pipeline.Ingest.model
        monkeypatch.setattr(pipeline.Ingest, "model", lambda self, source: loaded.append(source) or model(self, source))
        capsys.readouterr()
        assert main(ingest_args(url, tiny_model, data)) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"actstore: error: run {RUN} {LOCKED}") and err.count("\n") == 1, err
        assert loaded == []

        while committed_in(url) < 30 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the ingest ended before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    died = time.monotonic()

    run = Store(url).run(*RUN.split("/"))
    n = run.n_samples
    assert 30 <= n < 300 and n % 3 == 0 and not run.complete  # whole batches only
    assert not np.isnan(run.hidden_states[:, :n]).any()

    assert main(ingest_args(url, tiny_model, data)) == 1  # the dead writer's lease has not expired yet
    assert LOCKED in capsys.readouterr().err
    time.sleep(max(0.0, died + LEASE_SECONDS + 2.0 + 1.5 - time.monotonic()))  # ttl + margin + whole seconds
    assert main(ingest_args(url, tiny_model, data)) == 0  # resumes
    assert "broke the expired writer lease" in caplog.text
    assert main(ingest_args(clean, tiny_model, data)) == 0  # uninterrupted, in a folder

    resumed, reference = Store(url).run(*RUN.split("/")), Store(clean).run(*RUN.split("/"))
    assert resumed.complete and resumed.n_samples == reference.n_samples > n
    np.testing.assert_array_equal(resumed.hidden_states[:], reference.hidden_states[:])
    for name, values in reference.labels().items():
        np.testing.assert_array_equal(resumed.labels()[name], values)


def analyse_in_store(store: Store, methods: list[str], pair: tuple[str, str]) -> None:
    """Every layer's `paper` analysis and the pair's comparison, computed and cached in the store as a server's
    job does."""
    n_layers = store.run("tiny-llama", methods[0]).shape[0]
    outcomes = {
        (m, layer): layer_outcome(store, "tiny-llama", m, layer, PAPER, Mask())
        for m in methods
        for layer in range(1, n_layers)
    }
    assert all(o.error is None for o in outcomes.values()), [o.error for o in outcomes.values()]
    for layer in range(1, n_layers):
        compared = comparison_outcome(store, outcomes[pair[0], layer], outcomes[pair[1], layer], PAPER, Mask())
        assert compared.error is None, compared.error


def test_plot_draws_from_a_bucket_what_it_draws_from_a_folder(ingest_cli, bucket, tmp_path, capsys):
    url = f"{bucket}/plotted"
    methods = ["0shot", "1shot"]
    data = write_jsonl(tmp_path / "q.jsonl", [r for seed in range(4) for r in make_questions(seed)])
    for store in (url, ingest_cli.store):  # 180 questions a run: the analyses need over maxk=100 of them
        assert (
            ingest_cli("--methods", ",".join(methods), "--dataset", str(data), "--per-subject", "60", store_path=store)
            == 0
        )
        analyse_in_store(Store(store), methods, ("0shot", "1shot"))
        out = tmp_path / ("bucket" if store == url else "folder")
        assert (
            main(
                ["plot", "--store", str(store), "--model", "tiny-llama", "--compare", "0shot,1shot", "--out", str(out)]
            )
            == 0
        )
    for name in ("layers.csv", "comparison.csv", "summary.md"):
        assert (tmp_path / "bucket" / name).read_text() == (tmp_path / "folder" / name).read_text(), name
    layers = pd.read_csv(tmp_path / "bucket" / "layers.csv")
    assert sorted(layers.method.unique()) == methods and sorted(layers.layer.unique()) == [1, 2, 3]
    assert (tmp_path / "bucket" / "layers.png").stat().st_size > 10_000

    capsys.readouterr()
    assert main(["plot", "--store", url, "--model", "nope", "--out", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err == f"actstore: error: no runs of model 'nope' in {url}\n"
