"""``actstore serve --store s3://bucket/prefix`` (a real S3 API: moto's server on loopback): every read RPC
answers as for the same store in a folder, analyses run on a real Dask cluster whose worker processes read
the bucket themselves from run references, and a corrupted object is DATA_LOSS while the server serves on.

The stores are tiny and written through the Store API (``fill``, several commits); the Dask
cluster is one LocalCluster worker process, shared by every server of the module through ``--scheduler``.
"""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import s3fs
import xarray as xr
from dask._task_spec import Task
from distributed import Client as DaskClient
from distributed import LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from actstore.client import ActstoreError, Client
from actstore.server.process import ServerProcess
from actstore.store import Store, layout
from actstore.testing import LocalS3, derived_files, write_synthetic_run
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc

SMALL = dict(maxk=20, gride_range_max=16, id_scale_index=1, density_k=8)
METHODS = ("0shot", "1shot")
BIG = 2800  # samples: 3 layers of them are over the 1 MiB from which the server forwards stored chunks


def labels(n: int) -> dict[str, np.ndarray]:
    """Three subjects, four answers and predictions that are right one time in four: enough for analyses."""
    ids = np.arange(n)
    return {
        "sample": ids,
        "subject": np.array([f"s{i % 3}" for i in ids], dtype=object),
        "answer": np.array(["ABCD"[i % 4] for i in ids], dtype=object),
        "prediction": np.array(["ABCD"[(i // 2) % 4] for i in ids], dtype=object),
        "correct": ids % 4 == (ids // 2) % 4,
    }


def fill(store: Store, method: str, n_samples: int = 100, batch: int = 30) -> None:
    """Run ``m/<method>`` of ``n_samples``, ``batch`` samples a commit (several shards, a partial last one)."""
    write_synthetic_run(store, "m", method, n_samples=n_samples, batch=batch, labels=labels(n_samples))


def new_bucket(server: LocalS3, name: str) -> str:
    """A fresh bucket for a module's fixtures (conftest's ``bucket`` is per test); its URL."""
    return server.create_bucket(f"{name}-{random.randrange(16**6):06x}")


def write_tiny(root: str | Path) -> str:
    """Two runs of model ``m`` in the store at ``root``, in many small shards as conftest's small_chunks
    makes them (a module fixture runs before that per-test fixture); the store's URL."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "INNER_CHUNK_BYTES", 8 * 4 * 32)
        patch.setattr(layout, "SHARD_BYTES", 32 * 4 * 32)
        store = Store(root)
        for method in METHODS:
            fill(store, method)
    return store.url


def derived_objects(store: str | Path) -> dict:
    """Every file or object of the store's cached analyses with what changes when it is written again
    (a file's mtime; an object's ETag and LastModified): equal snapshots mean nothing was recomputed."""
    if not str(store).startswith("s3://"):
        return derived_files(Path(store))
    found = s3fs.S3FileSystem(skip_instance_cache=True).find(str(store).removeprefix("s3://"), detail=True)
    return {key: (info["ETag"], info["LastModified"]) for key, info in found.items() if "/derived/" in key}


class TaskArguments(SchedulerPlugin):
    """Records the arguments of every task the scheduler is given, as the worker will receive them."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple] = {}

    def update_graph(self, scheduler, *, tasks, **kwargs) -> None:
        for key in tasks:
            spec = scheduler.tasks[key].run_spec
            if isinstance(spec, Task):
                self.seen[str(key)] = (spec.func.__name__, spec.args)


@pytest.fixture(scope="module")
def dask_cluster(s3_endpoint) -> Iterator[tuple[str, TaskArguments]]:
    """An existing Dask cluster (one worker process, started after the AWS variables are set, which it
    inherits, as any cluster's workers get their environment); its address and a task recorder."""
    recorder = TaskArguments()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        cluster.scheduler.add_plugin(recorder)
        yield cluster.scheduler_address, recorder


@pytest.fixture(scope="module")
def stores(tmp_path_factory, local_s3_server) -> tuple[str, str]:
    """The same runs in a folder and in a bucket below a prefix: the two tiny ones, and one over a MiB in
    the default layout, which the server answers with stored chunks as they are (its fast path)."""
    roots = (
        write_tiny(tmp_path_factory.mktemp("served") / "store"),
        write_tiny(new_bucket(local_s3_server, "served") + "/stores/one"),
    )
    for root in roots:
        fill(Store(root), "big", n_samples=BIG, batch=BIG)
    return roots


@pytest.fixture(scope="module")
def servers(stores, dask_cluster, tmp_path_factory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """A server on each store, both sending analyses to the module's Dask cluster."""
    logs = tmp_path_factory.mktemp("logs")
    with (
        ServerProcess(stores[0], logs / "folder.log", "--scheduler", dask_cluster[0]) as folder,
        ServerProcess(stores[1], logs / "bucket.log", "--scheduler", dask_cluster[0]) as bucket,
    ):
        yield folder, bucket


@pytest.mark.parametrize(
    "url, says",
    [
        ("gs://b/x", "unsupported scheme gs://"),
        ("s3:/b/x", "write s3://"),
        ("s3://no-such-bucket/x", "no actstore store at s3://no-such-bucket/x"),
    ],
)
def test_serve_refuses_a_store_it_cannot_serve_in_one_line(url, says, tmp_path, s3_endpoint):
    done = subprocess.run(
        [sys.executable, "-m", "actstore", "serve", "--store", url, "--address", "127.0.0.1:0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("actstore: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert says in done.stderr
    assert list(tmp_path.iterdir()) == []  # no folder named after the URL


def read_rpcs(address: str) -> list:
    """Every read RPC over a range of requests, as raw messages (or a failure's code and details)."""
    run = pb.RunRef(model="m", method="0shot")
    ids, subject = pb.SampleSelection(ids=[99, 3, 50]), pb.LabelFilter(name="subject", values=["s1"])
    positions = pb.SampleSelection(positions=pb.Range(start=10, stop=70), filters=[subject])
    calls = [
        ("ListRuns", pb.ListRunsRequest()),
        ("ListRuns", pb.ListRunsRequest(page_size=1)),
        ("ListRuns", pb.ListRunsRequest(method="1shot")),
        ("DescribeRun", pb.DescribeRunRequest(run=run)),
        ("DescribeRun", pb.DescribeRunRequest(run=pb.RunRef(model="m", method="9shot"))),
        ("ReadLabels", pb.ReadLabelsRequest(run=run)),
        ("ReadLabels", pb.ReadLabelsRequest(run=run, samples=ids)),
        ("ReadLabels", pb.ReadLabelsRequest(run=run, samples=positions)),
        ("ReadStates", pb.ReadStatesRequest(run=run, accept_blosc=True)),
        ("ReadStates", pb.ReadStatesRequest(run=run)),
        ("ReadStates", pb.ReadStatesRequest(run=run, layers=[2, 0], samples=ids)),
        (
            "ReadStates",
            pb.ReadStatesRequest(
                run=run,
                layer_range=pb.Range(start=1, stop=3),
                samples=positions,
                hidden_range=pb.Range(start=4, stop=20),
                accept_blosc=True,
            ),
        ),
        ("ReadStates", pb.ReadStatesRequest(run=run, samples=pb.SampleSelection(ids=[37]), accept_blosc=True)),
        ("ReadStates", pb.ReadStatesRequest(run=run, dtype=pb.DTYPE_FLOAT16, allow_lossy=True)),
        ("ReadStates", pb.ReadStatesRequest(run=pb.RunRef(model="m", method="big"), accept_blosc=True)),
        (
            "ReadStates",
            pb.ReadStatesRequest(
                run=pb.RunRef(model="m", method="big"),
                accept_blosc=True,
                samples=pb.SampleSelection(positions=pb.Range(start=5, stop=2790)),
            ),
        ),
        ("ReadStates", pb.ReadStatesRequest(run=run, layers=[7])),
        ("ReadStates", pb.ReadStatesRequest(run=run, samples=pb.SampleSelection(ids=[100]))),
    ]
    with grpc.insecure_channel(address) as channel:
        stubs = [pb_grpc.CatalogServiceStub(channel), pb_grpc.DataServiceStub(channel)]
        answers = []
        for name, request in calls:
            method = getattr(next(s for s in stubs if hasattr(s, name)), name)
            try:
                answer = method(request, timeout=30)
                answers.append((name, list(answer) if name == "ReadStates" else answer))
            except grpc.RpcError as exc:
                answers.append((name, exc.code(), exc.details()))
    return answers


def test_every_read_rpc_answers_as_for_the_folder_store(servers, stores):
    folder, bucket = (read_rpcs(s.address) for s in servers)
    assert len(bucket) == len(folder)
    for got, expected in zip(bucket, folder):
        if len(expected) == 3:  # a failure: the same code and words, the store named as served
            assert got[:2] == expected[:2] and got[2].replace(stores[1], stores[0]) == expected[2], got
        else:
            assert got == expected, got[0]
    failures = [a[2] for a in folder if len(a) == 3]  # the requests meant to fail did, and no other
    assert failures == [
        "no run m/9shot",
        "no layer 7: the run has layers 0..2",
        "1 sample id(s) not in this run's committed samples, e.g. [100]",
    ], failures
    streamed = [a[1] for a in folder if a[0] == "ReadStates" and len(a) == 2]
    assert any(m.blocks for messages in streamed for m in messages)  # stored chunks forwarded as stored


def worker_evidence() -> dict:
    """Run on a Dask worker: its process, its S3 endpoint, and whether it opened S3 clients itself."""
    found = sys.modules.get("s3fs")
    return {
        "pid": os.getpid(),
        "endpoint": os.environ.get("AWS_ENDPOINT_URL"),
        "s3_clients": len(found.S3FileSystem._cache) if found else 0,
    }


def analysis(server: ServerProcess) -> xr.Dataset:
    with Client(server.address) as client:
        job = client.analyze("m", list(METHODS), layers=[1, 2], compare=[METHODS], compare_k=10, **SMALL)
        return job.result()


def test_an_analysis_on_the_bucket_runs_on_workers_that_read_it_themselves(servers, stores, dask_cluster, s3_endpoint):
    address, recorder = dask_cluster
    with DaskClient(address) as dask:
        assert all(e["s3_clients"] == 0 for e in dask.run(worker_evidence).values())  # nothing opened yet
        on_bucket = analysis(servers[1])
        evidence = list(dask.run(worker_evidence).values())
        dask.restart()  # the folder's job computes afresh: workers keep recent neighbour graphs in memory
        on_folder = analysis(servers[0])
    assert on_bucket.attrs.pop("job_id") != on_folder.attrs.pop("job_id")
    xr.testing.assert_identical(on_bucket, on_folder)
    assert on_bucket.n_clusters.shape == (2, 2) and (on_bucket.n_clusters.values >= 1).all()
    assert on_bucket.data_overlap.shape == (1, 2)
    # the worker, another process than the server's, opened the bucket through its own S3 client
    assert evidence and all(e["s3_clients"] > 0 and e["endpoint"] == s3_endpoint for e in evidence)
    assert not {e["pid"] for e in evidence} & {servers[1].proc.pid, os.getpid()}
    # every analysis task was sent a run reference (the store's URL, model, method, layer), never arrays
    sent = {key: args for key, (func, args) in recorder.seen.items() if func == "_task" and args[0] == stores[1]}
    assert sorted(args[1:4] for args in sent.values()) == [("m", m, layer) for m in METHODS for layer in (1, 2)]
    for args in sent.values():
        assert not any(isinstance(a, np.ndarray) for a in args) and len(pickle.dumps(args)) < 1024
    cached = derived_objects(stores[1])  # the worker cached what it computed from the bucket's bytes there
    assert {kind for key in cached for kind in ("neighbours", "density", "comparisons") if f"/{kind}/" in key} == {
        "neighbours",
        "density",
        "comparisons",
    }


@pytest.fixture
def corrupt(tmp_path, local_s3_server, dask_cluster) -> Iterator[ServerProcess]:
    """A server on a bucket store (the same runs as the other stores) whose object holding layer 1's samples
    32:64 has a flipped byte."""
    url = write_tiny(new_bucket(local_s3_server, "corrupt") + "/s")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    shard = f"{url.removeprefix('s3://')}/m/0shot/hidden_states/c/1/1/0"
    data = bytearray(fs.cat_file(shard))
    data[40] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    with ServerProcess(url, tmp_path / "log", "--scheduler", dask_cluster[0]) as server:
        yield server


def test_a_corrupted_object_is_data_loss_and_the_server_serves_on(corrupt):
    with Client(corrupt.address, retries=0) as client:
        with pytest.raises(ActstoreError) as read:
            client.hidden_states("m", "0shot", layers=[1])
        assert read.value.code is grpc.StatusCode.DATA_LOSS and "layer 1" in read.value.message
        job = client.analyze("m", ["0shot"], layers=[1], **SMALL)  # a Dask worker meets the bad bytes
        with pytest.raises(ActstoreError) as analysed:
            job.result()
        assert analysed.value.code is grpc.StatusCode.DATA_LOSS and "layer 1" in analysed.value.message
        states = client.hidden_states("m", "0shot", layers=[0, 2])  # the rest reads on
        np.testing.assert_array_equal(states.values, Store(corrupt.store).run("m", "0shot").read_states([0, 2]))
        assert [r["method"] for r in client.runs()] == list(METHODS)
    assert corrupt.proc.poll() is None
