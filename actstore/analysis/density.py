"""The study's density analyses of one layer, with DADApy fed precomputed neighbours.

Doimo et al. 2024 (docs/explanation/science.md, analyses 3-8): Gride intrinsic dimension at neighbour-rank
scales 2..64 (the estimate at one scale set as the ID), 2NN ID, kNN density, Advanced Density Peaks
clustering, its agreement with subject and answer labels (ARI), and label overlap. Beside the ARI with the
gold answers, the ARI with the model's own predicted letters tells "encodes its own answer" apart from
"encodes the right answer": for a model near chance the two differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from dadapy import Data
from sklearn.metrics import adjusted_rand_score

from actstore.analysis.params import PAPER, DensityParams


@dataclass
class Clusters:
    """What a neighbour graph alone gives: intrinsic dimension, density and density-peak clusters."""

    ids_gride: np.ndarray  # ID at each Gride scale
    id: float
    id_2nn: float
    n_clusters: int
    assignment: np.ndarray  # cluster of each point (halo off)
    core_fraction: float  # share of points outside the halo when the halo is on
    peak_log_density: np.ndarray  # log-density at each cluster's peak
    saddle_log_density: np.ndarray  # (clusters, clusters) log-density at the saddles (DADApy log_den_bord)


@dataclass
class LayerDensity(Clusters):
    """A layer of the study's questions: the clusters, and how they and the neighbourhoods follow the labels."""

    ari_subject: float
    ari_answer: float
    ari_prediction: float  # with the model's predicted letters
    overlap_subject: float
    overlap_answer: float


def neighbours_needed(params: DensityParams, subjects: np.ndarray, answers: np.ndarray) -> int:
    """The neighbour count every analysis of these labels needs: maxk, or more for label overlap."""
    needed = [params.maxk]
    for labels, fraction in ((subjects, params.subject_fraction), (answers, params.answer_fraction)):
        _, counts = np.unique(labels, return_counts=True)
        needed.append(int(fraction * counts.max()))
    return max(needed)


def cluster(distances: np.ndarray, indices: np.ndarray, params: DensityParams = PAPER) -> Clusters:
    """Gride and 2NN ID, kNN density and ADP clusters from a neighbour graph (``knn`` output, self first,
    duplicates already removed): the part of a layer's analysis that needs no labels."""
    maxk = params.maxk
    data = Data(distances=(distances[:, : maxk + 1], indices[:, : maxk + 1]), maxk=maxk, n_jobs=1, verbose=False)
    ids, _, _ = data.return_id_scaling_gride(range_max=params.gride_range_max)
    id_2nn = data.compute_id_2NN(set_attr=False)[0]
    data.set_id(ids[params.id_scale_index])
    data.compute_density_kNN(k=params.density_k)
    assignment = np.asarray(data.compute_clustering_ADP(Z=params.z, halo=False))
    peaks = np.asarray(data.log_den[data.cluster_centers])
    saddles = np.asarray(data.log_den_bord)
    n_clusters = int(data.N_clusters)
    with_halo = np.asarray(data.compute_clustering_ADP(Z=params.z, halo=True))
    return Clusters(
        ids_gride=np.asarray(ids),
        id=float(ids[params.id_scale_index]),
        id_2nn=float(id_2nn),
        n_clusters=n_clusters,
        assignment=assignment,
        core_fraction=float((with_halo != -1).mean()),
        peak_log_density=peaks,
        saddle_log_density=saddles,
    )


def analyse_layer(
    distances: np.ndarray,
    indices: np.ndarray,
    subjects: np.ndarray,
    answers: np.ndarray,
    predictions: np.ndarray,
    params: DensityParams = PAPER,
) -> LayerDensity:
    """All per-layer metrics from a neighbour graph (``knn`` output, self first, duplicates already removed)."""
    subjects, answers = _codes(subjects), _codes(answers)  # integer labels: every later step is faster
    found = cluster(distances, indices, params)
    return LayerDensity(
        **vars(found),
        ari_subject=float(adjusted_rand_score(subjects, found.assignment)),
        ari_answer=float(adjusted_rand_score(answers, found.assignment)),
        ari_prediction=float(adjusted_rand_score(_codes(predictions), found.assignment)),
        overlap_subject=label_overlap(indices, subjects, params.subject_fraction),
        overlap_answer=label_overlap(indices, answers, params.answer_fraction),
    )


def _codes(labels: np.ndarray) -> np.ndarray:
    return np.unique(labels, return_inverse=True)[1]


def label_overlap(indices: np.ndarray, labels: np.ndarray, class_fraction: float) -> float:
    """Mean share of same-label points among each point's k nearest (k = class_fraction x its class size),
    weighted by 1 / class size so that every class counts equally (the study's definition)."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    ks = (class_fraction * counts[inverse]).astype(int)
    if ks.max() > indices.shape[1] - 1:
        raise ValueError(f"label overlap needs {ks.max()} neighbours, the graph holds {indices.shape[1] - 1}")
    same = np.cumsum(inverse[indices[:, 1 : ks.max() + 1]] == inverse[:, None], axis=1)
    valid = ks > 0
    if not valid.any():  # every class too small for one neighbour at this fraction (a small run): undefined
        return float("nan")
    shares = same[valid, ks[valid] - 1] / ks[valid]
    weights = 1.0 / counts[inverse[valid]]
    return float(np.sum(shares * weights) / np.sum(weights))
