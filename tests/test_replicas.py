"""Several server replicas serve one store; a client given all their addresses spreads its calls over them
with gRPC's round_robin, gets the same answers from each, and keeps working when one goes down.

Which replica answered is read from each server's own access log (one line per call, ``gate.log_call``).
Every test runs on a store in a folder and on the same store in an S3 bucket (moto's S3 server on loopback).
"""

from __future__ import annotations

import re
import time

import grpc
import numpy as np
import pytest
import s3fs
import xarray as xr
from distributed import Client as DaskClient
from test_objectstore_server import SMALL, dask_cluster, derived_objects, new_bucket  # noqa: F401 (a fixture)
from test_server import _self_signed

from actstore.cli import main
from actstore.client import ActstoreError, Client
from actstore.client.client import AnalysisJob, channel_target
from actstore.server.process import ServerProcess
from actstore.v1 import actstore_pb2 as pb

RUN = ("tiny-llama", "0shot")
CALLS = 20


@pytest.fixture(scope="module", params=["folder", "bucket"])
def store(request, tmp_path_factory, tiny_model, questions_file) -> str:
    """The store every replica serves, as given to ``--store``: one small real run ingested by the CLI.
    Parametrized by where the store lives, so that these tests run unchanged on another kind of store:
    the bucket's is the folder's, object for file (a store's keys are the same in both)."""
    folder = tmp_path_factory.mktemp("replicas") / "store"
    assert (
        main(
            [
                "ingest",
                "--store",
                str(folder),
                "--model",
                str(tiny_model),
                "--dataset",
                str(questions_file),
                "--dtype",
                "float32",
                "--methods",
                RUN[1],
            ]
        )
        == 0
    )
    if request.param == "folder":
        return str(folder)
    url = new_bucket(request.getfixturevalue("local_s3_server"), "replicas") + "/shared/store"
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(folder), url.removeprefix("s3://"), recursive=True)
    return url


def start_replicas(store: str, folder, *extra: str, n: int = 2) -> list[ServerProcess]:
    servers: list[ServerProcess] = []
    try:
        for i in range(n):
            servers.append(ServerProcess(store, folder / f"replica-{i}.log", *extra))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@pytest.fixture
def replicas(store, tmp_path):
    servers = start_replicas(store, tmp_path)
    yield servers
    for server in servers:
        server.stop()


def answered(server: ServerProcess, method: str) -> int:
    """How many ``method`` calls this server answered OK, from its access log."""
    return len(re.findall(rf" {method} group=\S+ status=OK ", server.output()))


def answered_now(servers: list[ServerProcess], method: str, total: int) -> list[int]:
    """Each server's count once ``total`` calls are logged in all: a log line may trail its answer."""
    deadline = time.monotonic() + 10
    counts = [answered(s, method) for s in servers]
    while sum(counts) < total and time.monotonic() < deadline:
        time.sleep(0.05)
        counts = [answered(s, method) for s in servers]
    return counts


def answers(client: Client) -> tuple:
    """What a client reads of the store: the runs, one run's description, labels and states as bytes."""
    states = client.hidden_states(*RUN, layers=[0, 2], subject="anatomy")
    labels = client.labels(*RUN).to_dataframe()
    return client.runs(), client.describe(*RUN), labels.to_dict("list"), states.values.tobytes(), states.shape


def test_several_addresses_make_one_round_robin_target():
    target, options = channel_target("localhost:7001, 127.0.0.1:7002")
    assert target == "ipv4:127.0.0.1:7001,127.0.0.1:7002"
    assert ("grpc.service_config", '{"loadBalancingConfig": [{"round_robin": {}}]}') in options
    assert dict(options)["grpc.ssl_target_name_override"] == "localhost"
    assert channel_target(["[::1]:7001", "::1"])[0] == "ipv6:[::1]:7001,[::1]:50051"
    assert channel_target("localhost") == ("localhost:50051", [])  # one address: dialled as before
    assert channel_target(["127.0.0.1:7001"]) == ("127.0.0.1:7001", [])
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        channel_target("127.0.0.1:7001,[::1]:7002")
    with pytest.raises(ValueError, match="cannot resolve"):
        channel_target("127.0.0.1:7001,no-such-host.invalid:7002")
    with pytest.raises(ValueError, match="invalid port"):
        Client("127.0.0.1:7001,127.0.0.1:99999")


def test_calls_are_spread_over_the_replicas_which_answer_alike(replicas):
    with Client([s.address for s in replicas]) as both:
        expected = answers(both)
        for _ in range(CALLS):
            assert both.runs() == expected[0]
    counts = answered_now(replicas, "ListRuns", CALLS + 1)
    assert sum(counts) == CALLS + 1
    assert min(counts) >= CALLS // 4, f"calls per replica: {counts}"  # round-robin: about half each
    for server in replicas:  # each replica, asked alone, answers exactly what the balanced client got
        with Client(server.address) as alone:
            assert answers(alone) == expected
    assert expected[3] and len(expected[0]) == 1


def test_calls_keep_succeeding_when_a_replica_goes_down(replicas):
    down, up = replicas
    with Client(",".join(s.address for s in replicas)) as both:
        expected = both.hidden_states(*RUN, layers=1).values
        for _ in range(4):
            both.runs()
        assert min(answered_now(replicas, "ListRuns", 4)) > 0  # both connected and answering
        down.proc.kill()
        down.proc.wait()
        before = answered(up, "ReadStates")
        for _ in range(CALLS):
            np.testing.assert_array_equal(both.hidden_states(*RUN, layers=1).values, expected)
    assert answered_now([up], "ReadStates", before + CALLS) == [before + CALLS]


def test_query_cli_takes_several_addresses(replicas, tmp_path, capsys):
    addresses = ",".join(s.address for s in replicas)
    assert main(["query", "--address", addresses, "runs"]) == 0
    assert "/".join(RUN) in capsys.readouterr().out
    out = tmp_path / "states.npy"
    assert main(["query", "--address", addresses, "get", *RUN, "--layers", "1", "--out", str(out)]) == 0
    with Client(replicas[0].address) as alone:
        np.testing.assert_array_equal(np.load(out), alone.hidden_states(*RUN, layers=1).values)
    assert sum(answered_now(replicas, "ListRuns", 1)) == 1


def test_tls_with_several_replicas(store, tmp_path):
    cert, key = _self_signed(tmp_path)  # a certificate for "localhost", shared by the replicas
    servers = start_replicas(store, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        with Client([f"localhost:{s.port}" for s in servers], tls=cert) as both:
            for _ in range(CALLS):
                assert len(both.runs()) == 1
        assert min(answered_now(servers, "ListRuns", CALLS)) >= CALLS // 4
        with Client([f"localhost:{s.port}" for s in servers], retries=0) as plain:  # TLS is required
            with pytest.raises(ActstoreError) as refused:
                plain.runs()
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        for server in servers:
            server.stop()


def test_a_job_lives_on_its_replica_and_its_results_in_the_store(store, tmp_path, dask_cluster):
    """What actstore.server.jobs says of replicas: a job id asked of a replica that did not start it is
    NOT_FOUND, saying where jobs live; the same analysis started there is answered from the store's cache,
    which the first replica's job filled (nothing computed or written again)."""
    with DaskClient(dask_cluster[0]) as dask:
        dask.restart()  # no neighbour graphs in the workers' memory from another test: this job reads the store
    servers = start_replicas(store, tmp_path, "--scheduler", dask_cluster[0])
    try:
        with Client(servers[0].address) as on_a, Client(servers[1].address) as on_b:
            before = derived_objects(store)
            job = on_a.analyze(RUN[0], [RUN[1]], layers=[1, 2], **SMALL)
            first = job.result()
            cached = derived_objects(store)
            assert len(cached) > len(before)
            elsewhere = AnalysisJob(on_b, job.id)
            for ask in (elsewhere.status, lambda: list(elsewhere.watch()), elsewhere.cancel):
                with pytest.raises(ActstoreError) as caught:
                    ask()
                assert caught.value.code is grpc.StatusCode.NOT_FOUND
                assert f"no job '{job.id}' on this server" in caught.value.message
                assert "replica that started it" in caught.value.message
            assert job.status().state == pb.JOB_STATE_DONE  # the cancel on B did not reach A's job
            again = on_b.analyze(RUN[0], [RUN[1]], layers=[1, 2], **SMALL).result()
        assert derived_objects(store) == cached  # answered from the store: nothing computed or written again
        assert [answered(s, "StartAnalysis") for s in servers] == [1, 1]
        assert again.attrs.pop("job_id") != first.attrs.pop("job_id")
        xr.testing.assert_identical(again, first)
    finally:
        for server in servers:
            server.stop()
