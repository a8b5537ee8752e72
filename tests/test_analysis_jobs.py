"""Analysis jobs over a real server: start, watch, result, cache hit, cancel, bad parameter, forbidden run."""

import shutil
import time

import grpc
import numpy as np
import pytest

from actstore.cli import main
from actstore.client import ActstoreError, AnalysisJob, Client
from actstore.server.process import ServerProcess
from actstore.testing import derived_files, ingest_args, make_questions, write_jsonl
from actstore.v1 import actstore_pb2 as pb

SMALL = dict(maxk=20, gride_range_max=16, id_scale_index=1, density_k=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("jobs")
    data = write_jsonl(root / "q.jsonl", [r for seed in range(4) for r in make_questions(seed)])
    common = ingest_args(root / "store", tiny_model, data)
    assert main([*common, "--methods", "0shot,1shot", "--group", "lab-a", "--visibility", "public"]) == 0
    assert main([*common, "--methods", "2shot", "--group", "lab-b"]) == 0  # private to lab-b
    (root / "auth.toml").write_text(
        '[tokens]\n"tok-a-at-least-16-chars" = "lab-a"\n"tok-b-at-least-16-chars" = "lab-b"\n'
    )
    process = ServerProcess(root / "store", root / "log", "--auth", str(root / "auth.toml"), "--dask-workers", "2")
    yield process
    process.stop()


def test_start_watch_result_and_cache_hit(server):
    with Client(server.address, token="tok-a-at-least-16-chars") as c:
        job = c.analyze("tiny-llama", ["0shot", "1shot"], layers=[1, 2, 3], **SMALL)
        events = list(job.watch())
        assert events[-1].tasks_done == events[-1].tasks_total == 6
        assert [e.tasks_done for e in events] == sorted(e.tasks_done for e in events)
        assert sum(len(e.results) for e in events) == 6  # each layer's result sent once, as it finished
        assert len(job.status().results) == 6
        table = job.result()
        assert table.n_clusters.shape == (2, 3) and (table.n_clusters >= 1).all()
        assert (
            np.isfinite(table.ari_subject).all() and ((table.overlap_subject >= 0) & (table.overlap_subject <= 1)).all()
        )
        clusters = job.assignments("tiny-llama/0shot", 2)
        assert clusters.sizes["sample"] > 100
        stored = c.labels("tiny-llama", "0shot")  # cluster coordinates are sample ids, not positions
        assert set(clusters.sample.values.tolist()) == set(stored.sample.values.tolist())
        cached = derived_files(server.store)
        again = c.analyze("tiny-llama", ["0shot", "1shot"], layers=[1, 2, 3], **SMALL).result()
        assert derived_files(server.store) == cached and cached  # answered from the store's cache
        np.testing.assert_array_equal(again.n_clusters, table.n_clusters)
        np.testing.assert_allclose(again.ari_subject, table.ari_subject)


def test_request_id_makes_retries_idempotent_and_layer_zero_reports_its_error(server):
    with Client(server.address, token="tok-a-at-least-16-chars") as c:
        first = c.analyze("tiny-llama", ["0shot"], layers=[0, 1], request_id="retry-1", **SMALL)
        second = c.analyze("tiny-llama", ["0shot"], layers=[0, 1], request_id="retry-1", **SMALL)
        assert first.id == second.id
        table = first.result()
        assert "distinct rows" in table.error.sel(layer=0).item() and table.error.sel(layer=1).item() == ""


def test_cancel(server):
    with Client(server.address, token="tok-a-at-least-16-chars") as c:
        job = c.analyze(
            "tiny-llama",
            ["0shot", "1shot"],
            layers=[1, 2, 3],
            maxk=40,
            gride_range_max=32,
            id_scale_index=2,
            density_k=9,
        )
        assert job.cancel().state == pb.JOB_STATE_CANCELLED  # layers take far longer than this call
        with pytest.raises(ActstoreError) as caught:
            job.result()
        assert "CANCELLED" in caught.value.message
        assert job.status().state == pb.JOB_STATE_CANCELLED


@pytest.mark.parametrize(
    "kwargs,code",
    [
        (dict(methods=["0shot"], layers=[99]), grpc.StatusCode.NOT_FOUND),
        (dict(methods=["0shot"], z=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(methods=["0shot"], density_k=500), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(methods=["0shot"], preset="nope"), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(methods=["0shot"], z=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(methods=["0shot"], subject_fraction=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
        (
            dict(methods=["0shot"], layers=[1], **SMALL | dict(maxk=400)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),  # 333 samples
        (
            dict(methods=["0shot"], layers=[1], compare=[("0shot", "1shot")], compare_k=10**9, **SMALL),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (dict(methods=["9shot"]), grpc.StatusCode.NOT_FOUND),
        (dict(methods=["2shot"]), grpc.StatusCode.NOT_FOUND),
    ],
)
def test_bad_requests(server, kwargs, code):
    cached = settled(server.store)
    with Client(server.address, token="tok-a-at-least-16-chars") as c:
        with pytest.raises(ActstoreError) as caught:
            c.analyze("tiny-llama", **kwargs)
        assert caught.value.code == code
    time.sleep(0.5)
    assert derived_files(server.store) == cached  # nothing analysed, nothing cached


def settled(store, quiet_s: float = 1.0, timeout: float = 60.0) -> dict:
    """The store's cached analyses once none has been written for ``quiet_s`` (a cancelled job's tasks
    that had started still finish and cache their results)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        files = derived_files(store)
        if files == last:
            return files
        last = files
        time.sleep(quiet_s)
    raise TimeoutError(f"the store's derived files still change after {timeout} s")


def test_unknown_job(server):
    with Client(server.address, token="tok-a-at-least-16-chars") as c:
        with pytest.raises(ActstoreError) as caught:
            AnalysisJob(c, "no-such-job").status()
        assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_analyze_cli_prints_the_table(server, capsys, monkeypatch):
    monkeypatch.setenv("ACTSTORE_TOKEN", "tok-a-at-least-16-chars")
    assert (
        main(
            [
                "analyze",
                "--address",
                server.address,
                "tiny-llama",
                "--methods",
                "0shot",
                "--layers",
                "1:3",
                "--maxk",
                "20",
                "--gride-range-max",
                "32",
            ]
        )
        == 1
    )  # explicit Gride scales beyond maxk=20
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert (
        main(
            [
                "analyze",
                "--address",
                server.address,
                "tiny-llama",
                "--methods",
                "0shot,1shot",
                "--layers",
                "1,2",
                "--maxk",
                "120",
                "--per-subject",
                "45",
                "--compare",
                "0shot,1shot",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "n_clusters" in out and "tiny-llama/1shot" in out and "tiny-llama/0shot" in out
    assert "tiny-llama/0shot vs tiny-llama/1shot" in out and "data_overlap" in out
    assert "distinct rows" not in out  # 135 samples: every layer analysed


def test_compare_two_runs_and_dendrograms(server):
    from dadapy import Data
    from sklearn.metrics import adjusted_rand_score

    from actstore.analysis.neighbours import knn

    with Client(server.address, token="tok-a-at-least-16-chars") as c:
        job = c.compare("tiny-llama", "0shot", "1shot", layers=[1, 2], **SMALL)
        events = list(job.watch())
        assert events[-1].tasks_done == events[-1].tasks_total == 6  # 2 runs x 2 layers + 2 comparisons
        table = job.result()
        pair = "tiny-llama/0shot vs tiny-llama/1shot"
        assert table.pair.values.tolist() == [pair] and table.run.size == 2
        for layer in (1, 2):
            a, b = (job.assignments(f"tiny-llama/{m}", layer) for m in ("0shot", "1shot"))
            common = np.intersect1d(a.sample, b.sample)
            got = table.sel(pair=pair, layer=layer)
            assert got.n_common == len(common) and got.compare_error.item() == ""
            assert got.ari_clusters == pytest.approx(adjusted_rand_score(a.sel(sample=common), b.sel(sample=common)))
            x, y = (
                c.hidden_states("tiny-llama", m, layers=layer, samples=common.tolist()).values[0]
                for m in ("0shot", "1shot")
            )
            plain = Data(distances=knn(x, 30), maxk=30, n_jobs=1)
            assert got.data_overlap == pytest.approx(plain.return_data_overlap(distances=knn(y, 30), k=30))
            for run in ("tiny-llama/0shot", "tiny-llama/1shot"):
                ids, sizes = np.unique(job.assignments(run, layer), return_counts=True)
                large = ids[sizes > 30]
                tree = job.dendrogram(run, layer)
                if len(large) < 2:
                    assert tree is None
                else:
                    assert tree["clusters"].tolist() == large.tolist()
                    assert tree["linkage"].shape == (len(large) - 1, 4) and len(tree["labels"]) == len(large)
                    assert ((tree["majority_share"] > 0) & (tree["majority_share"] <= 1)).all()


def test_bad_comparisons(server):
    with Client(server.address, token="tok-a-at-least-16-chars") as c:
        for args, code in (
            (("0shot", "0shot"), grpc.StatusCode.INVALID_ARGUMENT),
            (("0shot", "tiny-llama/2shot"), grpc.StatusCode.NOT_FOUND),
            (("0shot", "other-model/1shot"), grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(ActstoreError) as caught:
                c.compare("tiny-llama", *args, **SMALL)
            assert caught.value.code == code, args


def test_a_job_is_visible_to_its_group_only(server):
    with (
        Client(server.address, token="tok-a-at-least-16-chars") as a,
        Client(server.address, token="tok-b-at-least-16-chars") as b,
    ):
        job = a.analyze("tiny-llama", ["0shot"], layers=[1], **SMALL)
        with pytest.raises(ActstoreError) as caught:
            AnalysisJob(b, job.id).status()
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ActstoreError):
            AnalysisJob(b, job.id).cancel()
        assert job.result().n_clusters.size == 1


def test_ended_jobs_are_forgotten_after_a_while(tmp_path):
    from actstore.server import jobs
    from actstore.server.auth import OPEN
    from actstore.server.job import Job

    manager = jobs.JobManager(tmp_path)
    ended, running = Job("ended", OPEN, 1), Job("running", OPEN, 1)
    manager._jobs, manager._by_request = {"ended": ended, "running": running}, {(OPEN.owner, "retry"): "ended"}
    ended.update(state=pb.JOB_STATE_DONE, stage="done")
    manager._forget_ended()
    assert set(manager._jobs) == {"ended", "running"}  # an hour has not passed
    manager.keep_ended_s = 0.0
    manager._forget_ended()
    assert set(manager._jobs) == {"running"} and not manager._by_request
    with pytest.raises(jobs.JobNotFound):
        manager.get("ended", OPEN)
    manager.close()


def test_a_job_over_corrupt_bytes_fails_as_data_loss_through_the_client(server, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(server.store, copy, ignore=shutil.ignore_patterns("derived"))
    layer_2 = copy / "tiny-llama" / "0shot" / "hidden_states" / "c" / "2"
    shard = min(p for p in layer_2.rglob("*") if p.is_file())
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with ServerProcess(copy, tmp_path / "log", "--dask-workers", "1") as corrupt, Client(corrupt.address) as c:
        job = c.analyze("tiny-llama", ["0shot"], layers=[2], **SMALL)
        with pytest.raises(ActstoreError) as failed:
            job.result()
    assert failed.value.code is grpc.StatusCode.DATA_LOSS
    assert "tiny-llama/0shot" in failed.value.message and "layer 2" in failed.value.message
