"""Analysis building blocks against scikit-learn and DADApy called directly."""

from pathlib import Path

import numpy as np
import pytest

from actstore.analysis.neighbours import knn
from actstore.analysis.rows import first_unique_rows, per_subject_mask


def blobs(n=600, d=40, centers=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, centers, n)
    means = rng.normal(scale=8.0, size=(centers, d))
    return means[labels] + rng.normal(size=(n, d)), labels


def test_first_unique_rows_keeps_first_occurrences_in_order():
    x = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4], [7, 8]], dtype=np.float32)
    kept, dropped = first_unique_rows(x)
    assert kept.tolist() == [0, 1, 3, 5] and dropped.tolist() == [2, 4]


def test_per_subject_mask_caps_each_subject_in_order():
    subjects = np.array(["a", "b", "a", "a", "b", "c"])
    assert per_subject_mask(subjects, 2).tolist() == [0, 1, 2, 4, 5]


# "torch-cpu" runs the GPU code path (torch, blocked top-k) on the CPU, so CI checks it without a GPU
DEVICES = ["cpu", "torch-cpu"]


@pytest.mark.parametrize("device", DEVICES)
def test_knn_is_exact_and_self_first(device, monkeypatch):
    monkeypatch.setattr("actstore.analysis.neighbours.BLOCK_BYTES", 8 * 600 * 7)  # several blocks of 7 rows
    x, _ = blobs()
    dist, idx = knn(x, 30, device=device)
    assert (idx[:, 0] == np.arange(len(x))).all() and (dist[:, 0] == 0).all()
    true = np.linalg.norm(x[:, None] - x[None], axis=-1)  # direct float64 differences, no expansion
    np.fill_diagonal(true, -1.0)
    np.testing.assert_allclose(dist[:, 1:], np.sort(true, axis=1)[:, 1:31], atol=1e-9)
    np.testing.assert_allclose(np.take_along_axis(true, idx[:, 1:], axis=1), dist[:, 1:], atol=1e-9)


def test_self_is_moved_first_when_rounding_misplaces_it():
    from actstore.analysis.neighbours import _put_self_first

    indices, distances = np.array([7, 3, 9, 4]), np.array([0.0, 0.0, 1.0, 2.0])
    _put_self_first(3, distances, indices)
    assert indices.tolist() == [3, 7, 9, 4] and distances.tolist() == [0.0, 0.0, 1.0, 2.0]
    indices, distances = np.array([7, 5, 9, 4]), np.array([0.0, 0.5, 1.0, 2.0])
    _put_self_first(3, distances, indices)  # absent: the farthest makes room
    assert indices.tolist() == [3, 7, 5, 9] and distances.tolist() == [0.0, 0.0, 0.5, 1.0]


@pytest.mark.parametrize("device", DEVICES)
def test_knn_with_ties_returns_valid_neighbour_sets(device):
    grid = np.array([[i, j] for i in range(10) for j in range(10)], dtype=np.float64)  # many exact ties
    dist, idx = knn(grid, 8, device=device)
    true = np.sqrt(((grid[:, None] - grid[None]) ** 2).sum(-1))
    np.testing.assert_allclose(dist, np.take_along_axis(true, idx, axis=1), atol=1e-12)
    assert (np.diff(dist, axis=1) >= -1e-12).all()
    np.testing.assert_allclose(dist[:, 1:], np.sort(true, axis=1)[:, 1:9], atol=1e-12)


def test_knn_rejects_a_bad_maxk():
    with pytest.raises(ValueError):
        knn(np.zeros((5, 2)), 5)


def test_layer_metrics_equal_dadapy_computing_its_own_neighbours():
    from dadapy import Data
    from sklearn.metrics import adjusted_rand_score

    from actstore.analysis.density import DensityParams, analyse_layer, neighbours_needed

    x, blob = blobs(n=800, d=12, centers=5)
    subjects = np.array([f"s{b}" for b in blob])
    answers = np.array(list("ABCD"))[np.random.default_rng(1).integers(0, 4, len(x))]
    predictions = np.array(list("ABCD"))[blob % 4]  # a model whose answer follows the cluster, right or wrong
    params = DensityParams(maxk=60, gride_range_max=32, id_scale_index=2, density_k=12, z=1.6)
    maxk = neighbours_needed(params, subjects, answers)
    dist, idx = knn(x, maxk)
    got = analyse_layer(dist, idx, subjects, answers, predictions, params)

    plain = Data(coordinates=x, maxk=params.maxk, n_jobs=1)
    plain.compute_distances(maxk=params.maxk)
    ids, _, _ = plain.return_id_scaling_gride(range_max=params.gride_range_max)
    id_2nn = plain.compute_id_2NN(set_attr=False)[0]
    plain.set_id(ids[params.id_scale_index])
    plain.compute_density_kNN(k=params.density_k)
    assignment = plain.compute_clustering_ADP(Z=params.z, halo=False)

    np.testing.assert_allclose(got.ids_gride, ids, rtol=1e-6)
    assert got.id_2nn == pytest.approx(id_2nn, rel=1e-6)
    assert got.n_clusters == plain.N_clusters
    np.testing.assert_array_equal(got.assignment, assignment)
    assert got.ari_subject == pytest.approx(adjusted_rand_score(subjects, assignment))
    assert got.ari_subject > 0.9 and abs(got.ari_answer) < 0.05  # the blobs are the subjects
    assert got.ari_prediction == pytest.approx(adjusted_rand_score(predictions, assignment))
    assert got.ari_prediction > 0.5  # encodes its own answer, not the right one
    assert got.overlap_subject > 0.9 and 0.1 < got.overlap_answer < 0.45
    assert 0 < got.core_fraction <= 1


def test_label_overlap_by_hand():
    from actstore.analysis.density import label_overlap

    # 4 points on a line: labels a a b b; k = int(1.0 * class size 2) = 2 neighbours each
    x = np.array([[0.0], [1.0], [2.5], [3.5]])
    _, idx = knn(x, 3)
    labels = np.array(["a", "a", "b", "b"])
    # point 0: neighbours 1 (a), 2 (b) -> 1/2; point 1: 0 (a), 2 (b) -> 1/2; point 2: 3, 1 -> 1/2; point 3: 2, 1 -> 1/2
    assert label_overlap(idx, labels, 1.0) == pytest.approx(0.5)


def test_layer_analysis_of_a_stored_run_is_cached(ingest_cli, tmp_path):
    from actstore.analysis.density import DensityParams
    from actstore.analysis.layers import Mask, analyse
    from actstore.store import Store
    from actstore.testing import make_questions, write_jsonl

    data = write_jsonl(tmp_path / "more.jsonl", [r for seed in range(4) for r in make_questions(seed)])
    assert ingest_cli("--dataset", str(data), "--methods", "0shot") == 0
    run = Store(ingest_cli.store).run("tiny-llama", "0shot")
    params = DensityParams(maxk=20, gride_range_max=16, id_scale_index=1, density_k=8)
    first, kept = analyse(run, 2, params, Mask(per_subject=30))
    assert len(kept) == 90 and len(first.assignment) == 90 and first.n_clusters >= 1
    again, kept_again = analyse(run, 2, params, Mask(per_subject=30))
    np.testing.assert_array_equal(again.assignment, first.assignment)
    assert again.ari_subject == first.ari_subject and again.id == first.id
    assert kept_again.tolist() == kept.tolist()
    sweep, _ = analyse(
        run, 2, DensityParams(maxk=20, gride_range_max=16, id_scale_index=1, density_k=8, z=0.5), Mask(per_subject=30)
    )
    assert sweep.n_clusters >= first.n_clusters  # a lower Z merges less
    derived = run.location.path / run.key / "derived"
    entries = {kind: [p for p in (derived / kind).iterdir() if p.is_dir()] for kind in ("neighbours", "density")}
    assert len(entries["neighbours"]) == 1  # one neighbour graph served both parameter sets
    assert len(entries["density"]) == 2
    recorded = [run.load_derived("density", entry.name)[1] for entry in entries["density"]]
    assert sorted(attrs["settings"]["z"] for attrs in recorded) == [0.5, params.z]  # each says what made it
    assert {attrs["per_subject"] for attrs in recorded} == {30}


@pytest.fixture
def small_run(ingest_cli, tmp_path):
    from actstore.testing import make_questions, write_jsonl

    data = write_jsonl(tmp_path / "more.jsonl", [r for seed in range(4) for r in make_questions(seed)])
    assert ingest_cli("--dataset", str(data), "--methods", "0shot") == 0
    return ingest_cli.store


SMALL = dict(maxk=20, gride_range_max=16, id_scale_index=1, density_k=8)


def test_layers_in_parallel_on_a_local_cluster_with_a_failing_layer(small_run):
    from actstore.analysis.density import DensityParams
    from actstore.analysis.scheduler import analyse_layers, dask_client

    with dask_client(n_workers=2) as client:
        outcomes = {
            o.layer: o
            for o in analyse_layers(client, small_run, [("tiny-llama", "0shot")], [0, 1, 2, 3], DensityParams(**SMALL))
        }
    assert sorted(outcomes) == [0, 1, 2, 3]
    assert all(outcomes[layer].error is None and outcomes[layer].result.n_clusters >= 1 for layer in (1, 2, 3))
    # layer 0 holds the last token's (normed) embedding: the same ":" for every prompt
    assert outcomes[0].result is None and "1 distinct rows" in outcomes[0].error


def test_an_existing_dask_cluster_runs_the_analysis(small_run, tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from actstore.analysis.density import DensityParams
    from actstore.analysis.scheduler import analyse_layers, dask_client
    from actstore.client import Client
    from actstore.server.process import ServerProcess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    scheduler = subprocess.Popen(
        [bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = subprocess.Popen(
        [bin_dir / "dask", "worker", address, "--nthreads", "1", "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        with dask_client(address) as client:
            client.wait_for_workers(1, timeout=60)
            outcomes = list(analyse_layers(client, small_run, [("tiny-llama", "0shot")], [2], DensityParams(**SMALL)))
        assert outcomes[0].error is None and outcomes[0].result.n_clusters >= 1
        server = ServerProcess(small_run, tmp_path / "server.log", "--scheduler", address)
        try:  # the server sends its analyses to that cluster
            with Client(server.address) as c:
                table = c.analyze("tiny-llama", ["0shot"], layers=[3], **SMALL).result()
            assert table.n_clusters.sel(layer=3).item() >= 1
        finally:
            server.stop()
    finally:
        worker.terminate()
        scheduler.terminate()
        worker.wait(30)
        scheduler.wait(30)


def test_comparison_equals_dadapy_overlap_and_sklearn_ari():
    from dadapy import Data
    from sklearn.metrics import adjusted_rand_score

    from actstore.analysis.compare import common_samples, compare_layer

    x, blob = blobs(n=500, d=10, centers=3)
    y = x + np.random.default_rng(3).normal(scale=2.0, size=x.shape)  # the same samples, perturbed
    ids_a, ids_b = np.arange(500), np.random.default_rng(4).permutation(np.arange(100, 600))
    in_a, in_b = common_samples(ids_a, ids_b)
    assert (ids_a[in_a] == ids_b[in_b]).all() and len(in_a) == 400 and (np.diff(in_a) > 0).all()
    y_stored = np.empty((500, 10))
    y_stored[in_b] = y[ids_a[in_a]]  # run b stores its samples in its own order
    other = blob[::-1].copy()
    got = compare_layer(x[in_a], y_stored[in_b], blob[in_a], other[in_a])
    plain = Data(coordinates=x[in_a], maxk=30, n_jobs=1)
    plain.compute_distances(maxk=30)
    assert got.data_overlap == pytest.approx(plain.return_data_overlap(coordinates=y[ids_a[in_a]], k=30))
    assert got.ari_clusters == pytest.approx(adjusted_rand_score(blob[in_a], other[in_a]))
    assert got.n_common == 400 and 0.2 < got.data_overlap < 1


def test_dendrogram_of_density_peaks():
    from scipy.cluster.hierarchy import dendrogram

    from actstore.analysis.compare import density_peak_dendrogram
    from actstore.analysis.density import DensityParams, analyse_layer

    x, blob = blobs(n=900, d=6, centers=6, seed=5)
    labels = np.array([f"s{b}" for b in blob])
    dist, idx = knn(x, 100)
    result = analyse_layer(
        dist, idx, labels, labels, labels, DensityParams(maxk=100, gride_range_max=32, id_scale_index=2)
    )
    tree = density_peak_dendrogram(result, labels)
    assert len(tree.clusters) >= 2 and tree.linkage.shape == (len(tree.clusters) - 1, 4)
    assert (tree.sizes > 30).all() and len(set(tree.labels)) == len(tree.labels)  # one blob per peak
    assert (tree.majority_share == 1.0).all()  # each peak's cluster is one blob's points
    assert len(dendrogram(tree.linkage, no_plot=True, labels=tree.labels)["ivl"]) == len(tree.clusters)


def test_first_unique_rows_survives_hash_collisions(monkeypatch):
    import builtins

    from actstore.analysis import rows

    monkeypatch.setattr(builtins, "hash", lambda _: 7)  # every row collides
    x = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [5.0, 6.0]])
    kept, dropped = rows.first_unique_rows(x)
    assert kept.tolist() == [0, 1, 3] and dropped.tolist() == [2]


def _write(store, method: str, states: np.ndarray, subjects: np.ndarray) -> None:
    n = states.shape[1]
    letters = np.array(list("ABCD"))[np.arange(n) % 4].astype(object)
    with store.writer(
        "blobs", method, recipe={"method": method}, attrs={}, n_layers=states.shape[0], hidden=states.shape[2]
    ) as writer:
        writer.add(
            states.astype(np.float32),
            {
                "sample": np.arange(n),
                "subject": subjects.astype(object),
                "answer": letters,
                "prediction": letters,
                "correct": np.ones(n, dtype=bool),
            },
        )


def test_runs_compared_from_their_stored_graphs_or_on_the_rows_both_kept(tmp_path):
    """Same samples in both runs: the stored neighbour graphs serve; a duplicate dropped in one run: kNN on
    the common rows. Either way the numbers equal compare_layer on the common rows."""
    from actstore.analysis.compare import compare_layer
    from actstore.analysis.density import DensityParams
    from actstore.analysis.layers import analyse, compare
    from actstore.store import Store

    x, blob = blobs(n=400, d=12, centers=4, seed=7)
    y = x + np.random.default_rng(8).normal(scale=3.0, size=x.shape)
    twin = y.copy()
    twin[11] = twin[10]  # run "twin" drops sample 11 as a duplicate
    store = Store(tmp_path / "store")
    subjects = np.array([f"s{b}" for b in blob])
    for method, states in (("a", x), ("b", y), ("twin", twin)):
        _write(store, method, states[None], subjects)
    params = DensityParams(**SMALL)
    a = store.run("blobs", "a")
    for other, n_common in (("b", 400), ("twin", 399)):
        b = store.run("blobs", other)
        got = compare(a, b, 0, params)
        (result_a, kept_a), (result_b, kept_b) = analyse(a, 0, params), analyse(b, 0, params)
        common = np.intersect1d(kept_a, kept_b)  # positions = sample ids here
        in_a, in_b = np.searchsorted(kept_a, common), np.searchsorted(kept_b, common)
        expected = compare_layer(
            x[common], (y if other == "b" else twin)[common], result_a.assignment[in_a], result_b.assignment[in_b]
        )
        assert got.n_common == n_common == expected.n_common
        assert got.data_overlap == pytest.approx(expected.data_overlap) and 0.1 < got.data_overlap < 1
        assert got.ari_clusters == pytest.approx(expected.ari_clusters)


def test_a_copy_of_a_run_in_another_store_is_read_from_that_store(tmp_path):
    """A worker remembers recent neighbour graphs; the same run (same recipe and samples) in a second store
    is still read from that store, so a corrupted copy is DATA_LOSS, not the first store's answer."""
    import shutil

    from actstore.analysis.density import DensityParams
    from actstore.analysis.layers import analyse
    from actstore.store import CorruptData, Store

    x, blob = blobs(n=200, d=12, centers=4, seed=3)
    original = Store(tmp_path / "original")
    _write(original, "a", x[None], np.array([f"s{b}" for b in blob]))
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    shard = tmp_path / "copy" / "blobs" / "a" / "hidden_states" / "c" / "0" / "0" / "0"
    damaged = bytearray(shard.read_bytes())
    damaged[20] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    params = DensityParams(**SMALL)
    analyse(original.run("blobs", "a"), 0, params)
    with pytest.raises(CorruptData):
        analyse(Store(tmp_path / "copy").run("blobs", "a"), 0, params)
