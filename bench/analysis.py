"""Analysis benchmark: actstore's cached, Dask-parallel path against plain DADApy, side by side.

    .venv/bin/python bench/analysis.py [--dims 576 4096] [--samples 9181]

Structured synthetic states (57 subjects as Gaussian clusters, random answers), N = 9,181:
1. one layer, first request: actstore (read, dedup, kNN, all metrics, cache writes) vs plain DADApy
   computing its own neighbours (the layer read, Data(coordinates=X), compute_distances(maxk), the
   same calls, label overlaps included: DADApy computes the extra neighbours they need itself); the
   same ID, clusters, assignment and overlaps asserted. Target ratio <= 1.0. The ratio against plain
   DADApy without the label overlaps is printed too.
2. a sweep on one layer (Z in {0.5, 1, 1.6, 2.1} x density k in {8, 16} x both class fractions):
   actstore reusing its cached neighbour graph vs plain DADApy redoing each setting. Target >= 8x.
3. comparing two runs at a layer from their stored neighbour graphs vs recomputing kNN (same result).
4. 8 layers on 2 Dask workers vs 1 (d = 576). Target >= 1.7x.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from dadapy import Data
from threadpoolctl import threadpool_limits

from actstore.analysis.compare import compare_layer
from actstore.analysis.density import PAPER, DensityParams
from actstore.analysis.layers import analyse, compare
from actstore.analysis.scheduler import analyse_layers, dask_client
from actstore.store import Store
from actstore.testing import write_synthetic_run

SUBJECTS = 57


def write_run(root: Path, n: int, d: int, n_layers: int, seed: int = 0, method: str | None = None) -> None:
    """A run of ``n`` samples of 57 subjects, each a Gaussian cluster whose spread fades with depth (as
    subjects do in the study), with random answers."""
    rng = np.random.default_rng(seed)
    subjects = rng.integers(0, SUBJECTS, n)
    answers = np.array(list("ABCD"))[rng.integers(0, 4, n)].astype(object)
    states = np.empty((n_layers, n, d), dtype=np.float32)
    for layer in range(n_layers):
        means = rng.normal(scale=3.0 / (1 + layer), size=(SUBJECTS, d))
        states[layer] = means[subjects] + rng.normal(size=(n, d))
    labels = {
        "sample": np.arange(n),
        "subject": np.array([f"s{s}" for s in subjects], dtype=object),
        "answer": answers,
        "prediction": answers,
        "correct": np.ones(n, dtype=bool),
    }
    write_synthetic_run(Store(root), "synthetic", method or f"d{d}", seed=seed, states=states, labels=labels)


def plain_dadapy(
    x: np.ndarray, subjects: np.ndarray, answers: np.ndarray, params: DensityParams, overlaps: bool = True
) -> tuple:
    """The same analysis with DADApy computing its own neighbours, as a user would without actstore.
    The label overlaps need more neighbours than maxk, which DADApy computes again by itself."""
    from sklearn.metrics import adjusted_rand_score

    data = Data(coordinates=x.astype(np.float64), maxk=params.maxk, n_jobs=1)
    data.compute_distances(maxk=params.maxk)
    ids, _, _ = data.return_id_scaling_gride(range_max=params.gride_range_max)
    data.compute_id_2NN(set_attr=False)
    data.set_id(ids[params.id_scale_index])
    data.compute_density_kNN(k=params.density_k)
    assignment = data.compute_clustering_ADP(Z=params.z, halo=False)
    data.compute_clustering_ADP(Z=params.z, halo=True)
    adjusted_rand_score(subjects, assignment)
    adjusted_rand_score(answers, assignment)
    found = (ids, np.asarray(assignment))
    if overlaps:
        codes = [np.unique(labels, return_inverse=True)[1] for labels in (subjects, answers)]
        found += (
            data.return_label_overlap(codes[0], class_fraction=params.subject_fraction),
            data.return_label_overlap(codes[1], class_fraction=params.answer_fraction),
        )
    return found


def compare_runs(root: Path, run, d: int, n: int) -> None:
    """A second run of the same samples, both analysed: comparing them from the stored neighbour graphs
    vs recomputing kNN on the rows (what compare does when the runs kept different samples)."""
    write_run(root, n, d, n_layers=1, seed=1, method=f"d{d}-other")
    other = Store(root).run("synthetic", f"d{d}-other")
    (ours, kept), (theirs, kept_other) = analyse(run, 0, PAPER), analyse(other, 0, PAPER)
    graphs_s, got = timed(lambda: compare(run, other, 0, PAPER))
    rows_s, expected = timed(
        lambda: compare_layer(
            run.read_rows([0], kept)[0], other.read_rows([0], kept_other)[0], ours.assignment, theirs.assignment
        )
    )
    assert got == expected, (got, expected)
    print(
        f"d={d}: comparing two runs at a layer: from the stored graphs {graphs_s:.2f} s, recomputing kNN "
        f"{rows_s:.2f} s: {rows_s / graphs_s:.1f}x faster; same overlap {got.data_overlap:.3f}"
    )


def _load_libraries() -> None:
    import dadapy  # noqa: F401
    import sklearn.neighbors  # noqa: F401


def timed(work):
    started = time.perf_counter()
    out = work()
    return time.perf_counter() - started, out


SWEEP = [
    replace(PAPER, z=z, density_k=k, subject_fraction=f, answer_fraction=f / 3)
    for z in (0.5, 1.0, 1.6, 2.1)
    for k in (8, 16)
    for f in (0.3, 0.15)
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 4096])
    parser.add_argument("--samples", type=int, default=9181)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=None):
        root = Path(tmp) / "store"
        for d in args.dims:
            write_run(root, args.samples, d, n_layers=8 if d == 576 else 1)
            run = Store(root).run("synthetic", f"d{d}")
            subjects, answers = run.labels()["subject"], run.labels()["answer"]
            ours_s, (ours, _) = timed(lambda: analyse(run, 0, PAPER))
            # plain DADApy gets the layer through actstore's fast reader, inside its timing: it needs the data too
            plain_s, (ids, assignment, subject_overlap, answer_overlap) = timed(
                lambda: plain_dadapy(run.read_states([0])[0], subjects, answers, PAPER)
            )
            x = run.read_states([0])[0]
            bare_s, _ = timed(lambda: plain_dadapy(x, subjects, answers, PAPER, overlaps=False))
            np.testing.assert_allclose(ours.ids_gride, ids, rtol=1e-6)
            assert np.array_equal(ours.assignment, assignment), "clusterings differ"
            np.testing.assert_allclose([ours.overlap_subject, ours.overlap_answer], [subject_overlap, answer_overlap])
            print(
                f"d={d}: one layer, first request: actstore {ours_s:.2f} s, plain DADApy {plain_s:.2f} s: "
                f"ratio {ours_s / plain_s:.2f} (target <= 1.0); same ID, overlaps and {ours.n_clusters} "
                f"clusters. (Plain DADApy without the label overlaps: {bare_s:.2f} s, ratio "
                f"{ours_s / bare_s:.2f}.)"
            )
            sweep_s, _ = timed(lambda: [analyse(run, 0, p) for p in SWEEP])
            plain_sweep_s, _ = timed(lambda: [plain_dadapy(x, subjects, answers, p) for p in SWEEP])
            print(
                f"d={d}: sweep of {len(SWEEP)} settings: actstore {sweep_s:.2f} s, plain DADApy "
                f"{plain_sweep_s:.2f} s: {plain_sweep_s / sweep_s:.1f}x faster (target >= 8)"
            )
            compare_runs(root, run, d, args.samples)
        if 576 in args.dims:
            seconds = {}
            for workers in (1, 2):
                shutil.rmtree(root / "synthetic" / "d576" / "derived", ignore_errors=True)
                with dask_client(n_workers=workers) as client:
                    client.wait_for_workers(workers)  # every worker up, its libraries loaded, before timing:
                    client.run(_load_libraries)  # the server's cluster lives on between jobs
                    seconds[workers], outcomes = timed(
                        lambda: list(analyse_layers(client, root, [("synthetic", "d576")], list(range(8)), PAPER))
                    )
                assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
            print(
                f"8 layers (d=576): 1 worker {seconds[1]:.1f} s, 2 workers {seconds[2]:.1f} s: "
                f"{seconds[1] / seconds[2]:.2f}x (target >= 1.7)"
            )


if __name__ == "__main__":
    main()
