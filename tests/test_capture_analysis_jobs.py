"""Density analyses of capture runs through the server: a job analyses the cloud a reduction makes of a site
(the Dask workers read the run as actstore's reader does), its numbers equal a local analysis, and a request
the cloud cannot take is INVALID_ARGUMENT in one line."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from actstore import testing
from actstore.analysis.params import PAPER, fitted
from actstore.analysis.tokens import Reduction, analyse_tokens
from actstore.cli import main
from actstore.client import ActstoreError, Client
from actstore.server.process import ServerProcess
from actstore.store import Store


@pytest.fixture(scope="module")
def served_capture(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("capture-jobs")
    args = testing.token_capture_args(root / "store", tiny_model, root, seed=4)
    assert main(args) == 0
    assert main([*args, "--name", "q"]) == 0  # a second run of the same texts, to compare with
    with ServerProcess(root / "store", root / "log", "--dask-workers", "1") as server:
        yield server, Store(root / "store")


def test_a_job_analyses_a_token_cloud_as_a_local_analysis_does(served_capture):
    server, store = served_capture
    with Client(server.address) as client:
        job = client.analyze(
            "tiny-llama", ["0shot"], layers=[1, 2], site="mlp_out", reduction="sample:80:3", label="topic"
        )
        table = job.result()
    run = store.run("tiny-llama", "0shot")
    for layer in (1, 2):
        local = analyse_tokens(
            run, layer, Reduction.parse("sample:80:3"), fitted(PAPER, samples=80), "mlp_out", "topic"
        )
        served = table.sel(run="tiny-llama/0shot", layer=layer)
        assert float(served["id"]) == pytest.approx(local.id) and int(served["n_clusters"]) == local.n_clusters
        assert float(served["ari_subject"]) == pytest.approx(local.ari) and np.isnan(float(served["ari_answer"]))


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"reduction": "median"}, "unknown reduction"),
        ({"label": "colour"}, "no label 'colour'"),
        ({"site": "attn_out"}, "no site 'attn_out'"),
        ({"reduction": "sample:100000"}, "more tokens"),
        ({"per_subject": 5}, "on their own"),
    ],
)
def test_a_cloud_the_run_cannot_give_is_invalid_argument(served_capture, options, words):
    server, _ = served_capture
    with Client(server.address) as client, pytest.raises(ActstoreError) as refused:
        client.analyze("tiny-llama", ["0shot"], layers=[1], **options)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.message


def test_capture_runs_are_not_compared(served_capture):
    server, _ = served_capture
    with Client(server.address) as client, pytest.raises(ActstoreError) as refused:
        client.analyze("tiny-llama", ["0shot"], layers=[1], compare=[("0shot", "q/0shot")])
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
