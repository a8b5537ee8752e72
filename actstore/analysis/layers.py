"""Analysing one layer of a stored run, with its neighbour graph and results cached in the store.

The neighbour graph is the expensive part and does not depend on the density parameters, so it is
kept per (run content, layer, mask, maxk) and every later analysis or parameter sweep of that layer
starts from it; results are kept per parameters too, so asking twice returns at once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict

import numpy as np

from actstore.analysis import NotAnalysed
from actstore.analysis.compare import OVERLAP_K, LayerComparison, common_samples, compare_graphs, compare_layer
from actstore.analysis.density import DensityParams, LayerDensity, analyse_layer, neighbours_needed
from actstore.analysis.keys import cache_key
from actstore.analysis.neighbours import knn
from actstore.analysis.rows import first_unique_rows, per_subject_mask
from actstore.analysis.tokens import Reduction, cloud_rows
from actstore.store import Run

log = logging.getLogger(__name__)

_ARRAYS = ("ids_gride", "assignment", "peak_log_density", "saddle_log_density")
RESULTS_VERSION = 2  # part of the cache key of results: 2 added ari_prediction, so older entries are recomputed


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which points enter the analysis. Runs of the study's questions: the first ``per_subject`` samples of
    each subject, or every sample. Capture runs: the cloud ``reduction`` makes of ``site``'s rows (see
    ``actstore.analysis.tokens``; by default each text's last token of the first site), its clusters compared
    with the ``label`` column when one is named."""

    per_subject: int | None = None
    site: str | None = None
    reduction: str = "last"
    label: str | None = None

    def positions(self, run: Run) -> np.ndarray:
        """The rows analysed (for a capture run: one per point of its cloud)."""
        if run.capture is not None:
            return cloud_rows(run, Reduction.parse(self.reduction))
        subjects = run.labels()["subject"]
        return np.arange(len(subjects)) if self.per_subject is None else per_subject_mask(subjects, self.per_subject)


_recent_graphs: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
RECENT_GRAPHS = 4  # kept in memory too: a parameter sweep on a layer reads its graph once


def neighbour_graph(run: Run, layer: int, mask: Mask, maxk: int) -> dict[str, np.ndarray]:
    """distances, indices (over the kept rows), kept and dropped positions, with at least ``maxk``
    neighbours; from memory or the store when a graph that large is there, computed (and kept) otherwise."""
    key = cache_key("knn", run.content_key(), layer, mask.per_subject)
    remembered = (
        f"{run.location}|{run.key}|{key}"  # the same run in two stores (a copy, a corrupted one) is read in each
    )
    graph = _recent_graphs.get(remembered)
    if graph is None or graph["indices"].shape[1] <= maxk:
        cached = run.load_derived("neighbours", key)
        graph = cached[0] if cached is not None and cached[0]["indices"].shape[1] > maxk else None
        if graph is None:
            graph = _compute_graph(run, layer, mask, maxk, key)
        _recent_graphs[remembered] = graph
        while len(_recent_graphs) > RECENT_GRAPHS:
            _recent_graphs.popitem(last=False)
    _recent_graphs.move_to_end(remembered)
    return graph


def _compute_graph(run: Run, layer: int, mask: Mask, maxk: int, key: str) -> dict[str, np.ndarray]:
    positions = mask.positions(run)
    x = run.read_rows([layer], positions)[0].astype(np.float64)
    kept, dropped = first_unique_rows(x)
    if dropped.size:
        log.info("%s/%s layer %d: %d duplicate rows dropped", run.model, run.method, layer, dropped.size)
    if len(kept) <= maxk:  # e.g. layer 0 of most runs: every prompt ends with the same token
        raise ValueError(
            f"layer {layer} has {len(kept)} distinct rows of {len(positions)} after dropping "
            f"duplicates; the analysis needs more than maxk={maxk}"
        )
    distances, indices = knn(x[kept], maxk)
    graph = {
        "distances": distances,
        "indices": indices.astype(np.int32),
        "kept": positions[kept],
        "dropped": positions[dropped],
    }
    run.save_derived("neighbours", key, graph, {"layer": layer, "maxk": maxk, "per_subject": mask.per_subject})
    return graph


def analyse(
    run: Run, layer: int, params: DensityParams, mask: Mask = Mask(), compute: bool = True
) -> tuple[LayerDensity, np.ndarray]:
    """The layer's density metrics and the positions of the samples they cover (duplicates dropped):
    from the store when they are there, else computed and stored (or NotAnalysed when not ``compute``)."""
    key = cache_key("density", RESULTS_VERSION, run.content_key(), layer, mask.per_subject, dataclasses.asdict(params))
    cached = run.load_derived("density", key)
    if cached is not None:
        arrays, attrs = cached
        scalars = {f.name: attrs[f.name] for f in dataclasses.fields(LayerDensity) if f.name not in _ARRAYS}
        return LayerDensity(**scalars, **{name: arrays[name] for name in _ARRAYS}), arrays["positions"]
    if not compute:
        raise NotAnalysed(f"{run.model}/{run.method} layer {layer}")
    labels = run.labels()
    positions = mask.positions(run)
    maxk = neighbours_needed(params, labels["subject"][positions], labels["answer"][positions])
    graph = neighbour_graph(run, layer, mask, maxk)
    kept = graph["kept"]
    result = analyse_layer(
        graph["distances"],
        graph["indices"],
        labels["subject"][kept],
        labels["answer"][kept],
        labels["prediction"][kept],
        params,
    )
    values = dataclasses.asdict(result)
    run.save_derived(
        "density",
        key,
        {**{name: np.asarray(values[name]) for name in _ARRAYS}, "positions": kept},
        {name: value for name, value in values.items() if name not in _ARRAYS}
        | {"layer": layer, "per_subject": mask.per_subject, "settings": dataclasses.asdict(params)},
    )
    return result, kept


def compare(
    run_a: Run,
    run_b: Run,
    layer: int,
    params: DensityParams,
    mask: Mask = Mask(),
    k: int = OVERLAP_K,
    compute: bool = True,
) -> LayerComparison:
    """Two runs at one layer, on the samples both analysed; cached in run a's ``derived/comparisons``.
    Each run's analysis comes from its cache when there (a job analyses both runs first)."""
    key = cache_key(
        "compare", run_a.content_key(), run_b.content_key(), layer, mask.per_subject, dataclasses.asdict(params), k
    )
    cached = run_a.load_derived("comparisons", key)
    if cached is not None:
        return LayerComparison(**{f.name: cached[1][f.name] for f in dataclasses.fields(LayerComparison)})
    if not compute:
        raise NotAnalysed(f"{run_a.model}/{run_a.method} vs {run_b.model}/{run_b.method} layer {layer}")
    (result_a, kept_a), (result_b, kept_b) = analyse(run_a, layer, params, mask), analyse(run_b, layer, params, mask)
    in_a, in_b = common_samples(run_a.labels()["sample"][kept_a], run_b.labels()["sample"][kept_b])
    clusters = result_a.assignment[in_a], result_b.assignment[in_b]
    if len(in_a) == len(kept_a) == len(kept_b):  # the same samples: both runs' neighbour graphs already hold them
        comparison = compare_graphs(
            _graph(run_a, layer, mask, k, in_a), _graph(run_b, layer, mask, k, in_b), *clusters, k
        )
    else:  # samples one run dropped as duplicates: neighbours among the common rows only
        comparison = compare_layer(
            run_a.read_rows([layer], kept_a[in_a])[0], run_b.read_rows([layer], kept_b[in_b])[0], *clusters, k
        )
    run_a.save_derived(
        "comparisons",
        key,
        {},
        dataclasses.asdict(comparison)
        | {
            "layer": layer,
            "other": f"{run_b.model}/{run_b.method}",
            "per_subject": mask.per_subject,
            "settings": dataclasses.asdict(params),
            "overlap_k": k,
        },
    )
    return comparison


def _graph(run: Run, layer: int, mask: Mask, k: int, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The run's stored neighbour graph over all its kept rows, its rows taken in ``order`` (a permutation)
    and its indices renumbered to match, so that two runs' graphs number the same samples alike."""
    graph = neighbour_graph(run, layer, mask, k)
    renumber = np.empty(len(order), dtype=np.int64)
    renumber[order] = np.arange(len(order))
    return graph["distances"][order, : k + 1], renumber[graph["indices"][order, : k + 1]]
