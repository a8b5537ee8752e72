"""A first analysis of a small run, through a real server: the study's settings fitted to what the run holds
and reported with the results, a run too small for any analysis refused in one line, and explicit settings
the run cannot meet refused as such; runs above 100 samples keep the study's settings exactly."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from actstore.analysis.params import MIN_SAMPLES, PAPER, fitted
from actstore.cli import main
from actstore.client import ActstoreError, Client
from actstore.server.process import ServerProcess
from actstore.store import Store
from actstore.testing import write_synthetic_run

MODEL = "synthetic"
SIZES = {"n40": 40, "n3": 3, "n150": 150}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    for method, n in SIZES.items():
        write_synthetic_run(Store(root / "store"), MODEL, method, n_layers=3, n_samples=n, hidden=32)
    process = ServerProcess(root / "store", root / "log", "--dask-workers", "1")
    yield process
    process.stop()


def test_a_40_sample_run_is_analysed_with_settings_fitted_to_it_and_reported(server, capsys):
    with Client(server.address) as client:
        table = client.analyze(MODEL, ["n40"], layers=[1, 2]).result()
    assert (table.error == "").all() and np.isfinite(table.id).all() and (table.n_clusters >= 1).all()
    settings = {
        name: table.attrs[name]
        for name in ("maxk", "gride_range_max", "id_scale_index", "density_k", "compare_k", "smallest_run_samples")
    }
    assert settings == dict(
        maxk=39, gride_range_max=39, id_scale_index=3, density_k=16, compare_k=30, smallest_run_samples=40
    )
    assert table.attrs["z"] == PAPER.z and "per_subject" not in table.attrs
    assert main(["analyze", "--address", server.address, MODEL, "--methods", "n40", "--layers", "1"]) == 0
    assert "settings: maxk=39 gride_range_max=39 id_scale_index=3 density_k=16" in capsys.readouterr().out


def test_a_run_too_small_for_any_analysis_is_one_clear_error(server, capsys):
    with Client(server.address) as client:
        with pytest.raises(ActstoreError) as caught:
            client.analyze(MODEL, ["n3"], layers=[1])
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{MODEL}/n3 holds 3 samples" in caught.value.message and f"at least {MIN_SAMPLES}" in caught.value.message
    assert main(["analyze", "--address", server.address, MODEL, "--methods", "n40,n3", "--layers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FAILED_PRECONDITION" in err and f"{MODEL}/n3 holds 3 samples" in err


def test_explicit_settings_the_run_cannot_meet_are_invalid_arguments(server):
    with Client(server.address) as client:
        for params, said in (
            (dict(maxk=60), "maxk=60 needs more than 60 samples; synthetic/n40 holds 40"),
            (dict(density_k=50), "density_k=50"),
            (dict(compare_k=40), "compare_k=40"),
        ):
            with pytest.raises(ActstoreError) as caught:
                if "compare_k" in params:
                    client.compare(MODEL, "n40", "n150", layers=[1], **params)
                else:
                    client.analyze(MODEL, ["n40"], layers=[1], **params)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, params
            assert said in caught.value.message and (
                "lowered to 39" in caught.value.message or "holds 40" in caught.value.message
            ), caught.value.message


def test_runs_above_100_samples_keep_the_study_settings_exactly(server):
    with Client(server.address) as client:
        table = client.analyze(MODEL, ["n150"], layers=[1]).result()
    assert {name: table.attrs[name] for name in dataclasses.asdict(PAPER)} == dataclasses.asdict(PAPER)
    assert table.attrs["smallest_run_samples"] == 150 and table.attrs["compare_k"] == 30
    for samples in (101, 150, 10_000):
        assert fitted(PAPER, (), samples) == PAPER
    small = dataclasses.replace(PAPER, maxk=20, gride_range_max=16, id_scale_index=1, density_k=8)
    assert fitted(small, ("maxk", "gride_range_max", "id_scale_index", "density_k"), 40) == small
