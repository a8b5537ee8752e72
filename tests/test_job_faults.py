"""Analysis jobs under faults, on a real local Dask cluster (and a real external scheduler and worker in
their own processes): workers killed again and again, the scheduler killed and started again, corrupt
stored bytes; and the request checks and quotas that keep one caller from wasting the cluster."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from actstore.analysis.density import DensityParams
from actstore.analysis.layers import Mask
from actstore.analysis.scheduler import dask_client
from actstore.cli import main
from actstore.server import jobs
from actstore.server.auth import Caller
from actstore.server.errors import TooLarge, status_of
from actstore.server.selection import BadRequest
from actstore.testing import derived_files, ingest_args, make_questions, write_jsonl
from actstore.v1 import actstore_pb2 as pb

SMALL = DensityParams(maxk=20, gride_range_max=16, id_scale_index=1, density_k=8)
A, B = ("tiny-llama", "0shot"), ("tiny-llama", "1shot")
ENDS_WITHIN_S = 120  # a job on the tiny runs takes seconds; a stuck one never ends


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("faults")
    data = write_jsonl(root / "q.jsonl", [r for seed in range(4) for r in make_questions(seed)])
    assert main(ingest_args(root / "store", tiny_model, data, "--methods", "0shot,1shot")) == 0
    return root / "store"


@pytest.fixture
def manager(store):
    manager = jobs.JobManager(store, None, 2)
    yield manager
    manager.close()


def ended(job: jobs.Job, timeout: float = ENDS_WITHIN_S) -> jobs.Job:
    """The job once it ended; fails the test when it has not within ``timeout``."""
    with job.changed:
        job.changed.wait_for(lambda: job.finished, timeout=timeout)
    assert job.finished, f"job still {pb.JobState.Name(job.state)} ({job.stage}) after {timeout} s"
    return job


def assert_done(job: jobs.Job) -> None:
    """DONE with every task's result, none of them an error."""
    assert job.state == pb.JOB_STATE_DONE, job.stage
    message = job.to_proto()
    outcomes = [*message.results, *message.comparisons]
    assert message.tasks_done == message.tasks_total == len(outcomes) and not any(o.error for o in outcomes)


def start(
    manager: jobs.JobManager, runs=(A, B), layers=(1, 2, 3), params=SMALL, pairs=(), k=30, group=None, request_id=""
) -> jobs.Job:
    return manager.start(Caller(group), list(runs), list(layers), params, Mask(), list(pairs), k, request_id)


def worker_processes(others: frozenset[int] = frozenset()) -> list[psutil.Process]:
    """The local cluster's worker processes: the nannies (in this process) spawned them. ``others``: pids of
    workers of clusters that earlier tests of this process left running, not counted."""
    return [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline()) and p.pid not in others]


def test_workers_killed_again_and_again_the_job_ends_and_the_next_one_runs(manager):
    others = frozenset(p.pid for p in worker_processes())
    manager.client()
    assert len(worker_processes(others)) == 2
    stop, kills = threading.Event(), []

    def kill_workers() -> None:
        while not stop.is_set():
            for process in worker_processes(others):
                try:
                    os.kill(process.pid, signal.SIGKILL)
                    kills.append(process.pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)

    killer = threading.Thread(target=kill_workers)
    killer.start()
    try:
        job = start(manager, params=DensityParams(maxk=21, gride_range_max=16, id_scale_index=1, density_k=8))
        time.sleep(15)
    finally:
        stop.set()
        killer.join()
    assert len(kills) > 20
    ended(job)
    if job.state != pb.JOB_STATE_DONE:  # the tasks may have run out of allowed worker deaths
        assert job.state == pb.JOB_STATE_FAILED and "KilledWorker" in job.stage, job.stage
        assert job.to_proto().failure_code == grpc.StatusCode.ABORTED.value[0]
    else:
        assert_done(job)
    assert_done(ended(start(manager)))  # the cluster is back at its size, and works
    assert len(worker_processes(others)) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dask_process(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "dask"), *args, "--no-dashboard"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port} after {timeout} s")


def test_a_dead_scheduler_fails_jobs_with_the_reason_and_is_reconnected_when_back(store, tmp_path):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes: list[subprocess.Popen] = []

    def cluster() -> subprocess.Popen:
        """A scheduler on ``address`` and one worker; returns the scheduler."""
        scheduler = dask_process("scheduler", "--host", "127.0.0.1", "--port", str(port), log=tmp_path / "log")
        processes.append(scheduler)
        wait_for_port(port)
        processes.append(dask_process("worker", address, "--nworkers", "1", "--nthreads", "1", log=tmp_path / "log"))
        return scheduler

    cluster()
    manager = jobs.JobManager(store, address)
    try:
        assert_done(ended(start(manager, runs=[A], layers=[1])))
        for process in processes:
            process.kill()
            process.wait()
        job = ended(start(manager, runs=[A], layers=[2]))
        assert job.state == pb.JOB_STATE_FAILED and not job.outcomes
        assert f"the Dask scheduler at {address} is unreachable" in job.stage
        assert job.to_proto().failure_code == grpc.StatusCode.UNAVAILABLE.value[0]
        scheduler = cluster()  # back on the same address: the next job connects again
        assert_done(ended(start(manager, runs=[A, B], layers=[2])))
        job = start(manager, params=dataclasses.replace(SMALL, maxk=30))  # six tasks on one worker thread
        with job.changed:
            job.changed.wait_for(lambda: job.state == pb.JOB_STATE_RUNNING, timeout=60)
        scheduler.kill()  # while the job runs
        job = ended(job)
        assert job.state == pb.JOB_STATE_FAILED and len(job.outcomes) < job.total
        assert f"the Dask scheduler at {address} is unreachable (lost while the job ran)" in job.stage
        assert job.to_proto().failure_code == grpc.StatusCode.UNAVAILABLE.value[0]
    finally:
        manager.close()
        for process in processes:
            process.kill()
            process.wait()


def test_progress_counts_distinct_tasks(manager):
    job = start(manager, runs=[A, A, B], layers=[1, 1, 2], pairs=[(A, B), (A, B)])
    assert job.total == (2 + 1) * 2  # two runs and one pair, at two layers
    assert_done(ended(job))
    assert job.to_proto().tasks_done == job.to_proto().tasks_total == 6


@pytest.mark.parametrize(
    "params",
    [
        dict(z=math.nan),
        dict(z=math.inf),
        dict(z=0.0),
        dict(z=-1.0),
        dict(subject_fraction=math.nan),
        dict(answer_fraction=math.inf),
        dict(maxk=10**12),
        dict(maxk=1),
        dict(density_k=0),
        dict(gride_range_max=10**9),
    ],
)
def test_bad_parameters_are_refused(params):
    small = dict(maxk=20, gride_range_max=16, id_scale_index=1, density_k=8)
    request = pb.StartAnalysisRequest(params=pb.AnalysisParams(**{**small, **params}))
    with pytest.raises(BadRequest) as caught:
        jobs.params_from(request)
    assert status_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(params=DensityParams(maxk=400, gride_range_max=16, id_scale_index=1, density_k=8)), "maxk=400"),
        (dict(pairs=[(A, B)], k=333), "compare_k=333"),  # each run holds 333 samples
        (dict(pairs=[(A, B)], k=10**9), "compare_k must lie in"),
    ],
)
def test_neighbour_counts_the_runs_cannot_meet_are_refused_and_nothing_is_cached(manager, store, change, message):
    before = derived_files(store)
    with pytest.raises(BadRequest, match=message):
        start(manager, **change)
    time.sleep(1)
    assert derived_files(store) == before and not manager._jobs


def test_a_job_on_a_cluster_without_workers_says_so_and_runs_once_one_joins(store):
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=0, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=":0"
    ) as cluster:
        manager = jobs.JobManager(store, cluster.scheduler_address)
        try:
            job = start(manager, layers=[1])
            with job.changed:
                job.changed.wait_for(lambda: "no workers" in job.stage, timeout=30)
            assert job.state == pb.JOB_STATE_RUNNING and "has no workers" in job.to_proto().stage, job.stage
            cluster.scale(1)
            assert_done(ended(job))
        finally:
            manager.close()


def test_quotas_of_running_and_kept_jobs_per_group(store):
    manager = jobs.JobManager(store, None, 2, max_running=2, max_kept=2)
    try:
        first = [start(manager, layers=[layer], group="lab-a") for layer in (1, 2)]
        with pytest.raises(TooLarge) as caught:  # both still queued or running: the cluster is starting
            start(manager, layers=[3], group="lab-a")
        assert status_of(caught.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = start(manager, layers=[3], group="lab-b")  # another group's quota is its own
        for job in (*first, other):
            assert_done(ended(job))
        later = [ended(start(manager, layers=[layer], group="lab-a")) for layer in (3, 1)]
        manager.get(other.id, Caller("lab-b"))
        for job in later:
            assert manager.get(job.id, Caller("lab-a")) is job
        with pytest.raises(jobs.JobNotFound):  # three ended jobs of lab-a: the oldest is forgotten
            manager.get(first[0].id, Caller("lab-a"))
    finally:
        manager.close()


def test_an_ended_job_keeps_no_arrays_and_reads_its_results_back_from_the_store(manager):
    job = start(manager, layers=[1, 2], pairs=[(A, B)])
    watched, sent = {}, 0  # what a watcher got while the job ran, as WatchJob sends it
    while sent < job.total:
        with job.changed:
            job.changed.wait(0.1)
            event = job.to_proto(since=sent)
        sent = event.tasks_done
        watched.update(messages(event))
    assert_done(job)
    assert len(pickle.dumps(job.outcomes)) < 1000  # names and layers, not clusters and sample ids
    again = messages(job.to_proto())
    assert again == watched and len(again) == job.total


def messages(job: pb.Job) -> dict[tuple, bytes]:
    """A Job message's results and comparisons by run (or pair) and layer."""
    out = {(r.run.method, r.layer): r.SerializeToString(deterministic=True) for r in job.results}
    return out | {
        (c.runs.a.method, c.runs.b.method, c.layer): c.SerializeToString(deterministic=True) for c in job.comparisons
    }


def test_many_jobs_share_a_bounded_number_of_threads(manager):
    assert_done(ended(start(manager, layers=[1])))  # the cluster and Dask's threads are up
    threads = threading.active_count()
    running = [
        start(manager, runs=[run], layers=[layer], group=f"group-{i}")
        for i, (run, layer) in enumerate((run, layer) for run in (A, B) for layer in (1, 2, 3))
    ]
    most = threads
    while not all(job.finished for job in running):
        most = max(most, threading.active_count())
        time.sleep(0.05)
    for job in running:
        assert_done(job)
    assert most <= threads + 1, f"{most - threads} more threads while {len(running)} jobs ran"


def test_corrupt_stored_bytes_fail_the_job_with_the_message(store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("derived"))
    layer_2 = copy / "tiny-llama" / "0shot" / "hidden_states" / "c" / "2"
    shard = min(p for p in layer_2.rglob("*") if p.is_file())  # the layer's first samples
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    manager = jobs.JobManager(copy, None, 2)
    try:
        job = ended(start(manager, runs=[A], layers=[1, 2]))
        assert job.state == pb.JOB_STATE_FAILED, job.stage
        assert all(part in job.stage for part in ("CorruptData", "tiny-llama/0shot", "layer 2")), job.stage
        assert job.to_proto().failure_code == grpc.StatusCode.DATA_LOSS.value[0]
        assert_done(ended(start(manager, runs=[B], layers=[2])))  # the server goes on
    finally:
        manager.close()


def test_a_local_cluster_closes_with_its_client():
    """A library user's ``with dask_client():`` leaves no worker processes behind (it left two before)."""
    others = frozenset(p.pid for p in worker_processes())
    with dask_client(n_workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
    deadline = time.monotonic() + 20
    while worker_processes(others) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker_processes(others) == []
