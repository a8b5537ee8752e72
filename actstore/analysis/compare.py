"""Comparing two runs at the same layer (e.g. 0-shot vs 5-shot, base vs fine-tuned), and the
dendrogram of a layer's density peaks (docs/explanation/science.md, analyses 9 and 10)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from dadapy import Data
from scipy.cluster.hierarchy import linkage
from sklearn.metrics import adjusted_rand_score

from actstore.analysis.density import LayerDensity
from actstore.analysis.neighbours import knn
from actstore.analysis.params import OVERLAP_K

DENDROGRAM_MIN_POINTS = 30


@dataclass
class LayerComparison:
    n_common: int  # samples present (and not duplicates) in both runs
    data_overlap: float  # mean share of common k nearest neighbours
    ari_clusters: float  # agreement of the two runs' clusterings on the common samples


def common_samples(ids_a: np.ndarray, ids_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in a and in b of the sample ids both hold, in a's order."""
    _, in_a, in_b = np.intersect1d(ids_a, ids_b, assume_unique=True, return_indices=True)
    order = np.argsort(in_a)
    return in_a[order], in_b[order]


Graph = tuple[np.ndarray, np.ndarray]  # (distances, indices) as knn returns them, self first


def compare_layer(
    x_a: np.ndarray, x_b: np.ndarray, assignment_a: np.ndarray, assignment_b: np.ndarray, k: int = OVERLAP_K
) -> LayerComparison:
    """Rows of ``x_a`` and ``x_b`` are the same samples in the same order (see common_samples)."""
    _check_size(len(x_a), k)
    return compare_graphs(knn(x_a, k), knn(x_b, k), assignment_a, assignment_b, k)


def compare_graphs(
    graph_a: Graph, graph_b: Graph, assignment_a: np.ndarray, assignment_b: np.ndarray, k: int = OVERLAP_K
) -> LayerComparison:
    """The same from neighbour graphs (at least k neighbours) of the same samples, numbered alike."""
    n = len(graph_a[1])
    _check_size(n, k)
    a, b = ((d[:, : k + 1], i[:, : k + 1]) for d, i in (graph_a, graph_b))
    overlap = Data(distances=a, maxk=k, n_jobs=1).return_data_overlap(distances=b, k=k)
    return LayerComparison(
        n_common=n, data_overlap=float(overlap), ari_clusters=float(adjusted_rand_score(assignment_a, assignment_b))
    )


def _check_size(n_common: int, k: int) -> None:
    if n_common <= k:
        raise ValueError(f"the runs share {n_common} analysed samples; the data overlap needs more than k={k}")


@dataclass
class Dendrogram:
    clusters: np.ndarray  # ids of the clusters drawn (those with more than DENDROGRAM_MIN_POINTS points)
    sizes: np.ndarray
    labels: list[str]  # each cluster's most common label (e.g. subject)
    majority_share: np.ndarray  # the share of its points that label holds
    linkage: np.ndarray  # scipy linkage matrix, ready for scipy.cluster.hierarchy.dendrogram


def density_peak_dendrogram(
    result: LayerDensity, labels: np.ndarray, min_points: int = DENDROGRAM_MIN_POINTS
) -> Dendrogram:
    """Peaks joined by the depth of the valley between them: dissimilarity = highest peak log-density
    minus the saddle log-density of the pair, merged with 'weighted' linkage (the study's recipe)."""
    ids, sizes = np.unique(result.assignment, return_counts=True)
    keep = ids[(sizes > min_points) & (ids >= 0)]
    if len(keep) < 2:
        raise ValueError(f"a dendrogram needs two clusters of more than {min_points} points, found {len(keep)}")
    saddles = result.saddle_log_density[np.ix_(keep, keep)]
    dissimilarity = result.peak_log_density.max() - saddles
    upper = dissimilarity[np.triu_indices(len(keep), k=1)]
    majority, share = [], []
    for cluster in keep:
        values, counts = np.unique(labels[result.assignment == cluster], return_counts=True)
        majority.append(str(values[counts.argmax()]))
        share.append(counts.max() / counts.sum())
    return Dendrogram(
        clusters=keep,
        sizes=sizes[np.isin(ids, keep)],
        labels=majority,
        majority_share=np.asarray(share),
        linkage=linkage(upper, method="weighted"),
    )
