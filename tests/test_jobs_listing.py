"""Listing one's analysis jobs and re-attaching to one, through real servers: from a second client with the
same token (watch, result, cancel), never another group's or another open caller's, and from the shell."""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc
import pytest

from actstore.cli import main
from actstore.client import ActstoreError, Client
from actstore.server.process import ServerProcess
from actstore.store import Store
from actstore.testing import write_synthetic_run
from actstore.v1 import actstore_pb2 as pb

MODEL = "synthetic"
TOKEN_A, TOKEN_B = "tok-a-at-least-16-chars", "tok-b-at-least-16-chars"
SMALL = dict(maxk=20, gride_range_max=16, id_scale_index=1, density_k=8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("listing") / "store"
    write_synthetic_run(Store(root), MODEL, "small", n_layers=3, n_samples=60, hidden=16)
    write_synthetic_run(Store(root), MODEL, "large", n_layers=8, n_samples=3000, hidden=64, seed=1)
    return root


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth")
    (folder / "auth.toml").write_text(f'[tokens]\n"{TOKEN_A}" = "lab-a"\n"{TOKEN_B}" = "lab-b"\n')
    process = ServerProcess(store, folder / "log", "--auth", str(folder / "auth.toml"), "--dask-workers", "1")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def open_server(store, tmp_path_factory):
    process = ServerProcess(store, tmp_path_factory.mktemp("open") / "log", "--dask-workers", "1")
    yield process
    process.stop()


def test_a_job_is_listed_and_reattached_from_a_second_client_with_the_same_token(server):
    with Client(server.address, token=TOKEN_A) as first, Client(server.address, token=TOKEN_A) as second:
        started = first.analyze(MODEL, ["small"], layers=[1, 2], **SMALL)
        listed = {job.id: job for job in second.jobs()}
        assert started.id in listed
        seen = listed[started.id].seen
        assert seen["runs"] == [f"{MODEL}/small"] and seen["tasks_total"] == 2
        assert seen["state"] in ("queued", "running", "done") and 0 <= seen["tasks_done"] <= 2
        assert abs(seen["started"] - datetime.now().astimezone()) < timedelta(minutes=5)
        shown = repr(listed[started.id])
        assert started.id in shown and f"{MODEL}/small" in shown and "/2 tasks" in shown

        attached = second.job(started.id)
        table = attached.result()
        assert table.run.values.tolist() == [f"{MODEL}/small"] and table.layer.values.tolist() == [1, 2]
        assert (table.error == "").all() and table.attrs["maxk"] == 20
        assert [event.state for event in attached.watch()][-1] == pb.JOB_STATE_DONE
        assert next(job for job in second.jobs() if job.id == started.id).seen["state"] == "done"


def test_a_reattached_job_can_be_cancelled(server):
    with Client(server.address, token=TOKEN_A) as first, Client(server.address, token=TOKEN_A) as second:
        started = first.analyze(MODEL, ["large"], layers=range(1, 8))
        assert second.job(started.id).cancel().state == pb.JOB_STATE_CANCELLED  # layers take far longer
        assert next(job for job in second.jobs() if job.id == started.id).seen["state"] == "cancelled"
        assert first.job(started.id).status().state == pb.JOB_STATE_CANCELLED


def test_another_group_lists_none_of_them_and_cannot_reattach(server):
    with Client(server.address, token=TOKEN_A) as a, Client(server.address, token=TOKEN_B) as b:
        ours = a.analyze(MODEL, ["small"], layers=[1], **SMALL)
        theirs = b.analyze(MODEL, ["small"], layers=[2], **SMALL)
        assert ours.id not in {job.id for job in b.jobs()} and theirs.id in {job.id for job in b.jobs()}
        assert theirs.id not in {job.id for job in a.jobs()}
        with pytest.raises(ActstoreError) as caught:
            b.job(ours.id)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        ours.result(), theirs.result()


def test_under_open_access_each_caller_lists_its_own_jobs_only(open_server):
    with (
        Client(open_server.address, token="alice") as alice,
        Client(open_server.address, token="bob") as bob,
        Client(open_server.address, token="alice") as alice_again,
    ):
        job = alice.analyze(MODEL, ["small"], layers=[1], **SMALL)
        assert job.id in {j.id for j in alice_again.jobs()}
        assert job.id not in {j.id for j in bob.jobs()}  # bob may see it by id, as open access lets him
        job.result()


def test_the_shell_lists_jobs_and_follows_one(server, capsys, monkeypatch):
    monkeypatch.setenv("ACTSTORE_TOKEN", TOKEN_A)
    with Client(server.address, token=TOKEN_A) as client:
        job = client.analyze(MODEL, ["small"], layers=[1], **SMALL)
    assert main(["query", "--address", server.address, "jobs"]) == 0
    listed = capsys.readouterr().out
    assert listed.splitlines()[0].split() == ["job", "state", "tasks", "started", "runs"]
    assert any(line.startswith(job.id) and f"{MODEL}/small" in line for line in listed.splitlines())
    assert main(["analyze", "--address", server.address, "--attach", job.id]) == 0
    followed = capsys.readouterr().out
    assert "n_clusters" in followed and f"{MODEL}/small" in followed and "settings: maxk=20" in followed
    assert main(["analyze", "--address", server.address, "--attach", job.id, MODEL]) == 1
    assert "--attach" in capsys.readouterr().err
