"""Exact Euclidean k-nearest neighbours, in the form DADApy takes precomputed.

On the CPU this is scikit-learn's brute force (chunked, so memory stays bounded, and parallel in C):
measured here it is as fast as anything exact we tried (REFERENCE.md; a NumPy block-and-partition
version ran at half its speed). Each point comes back as its own neighbour 0 at distance 0, which DADApy
expects; rows must be free of exact duplicates (see rows.first_unique_rows).
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors


def knn(x: np.ndarray, maxk: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices (N, maxk + 1) of each row's nearest rows, itself first."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 0 < maxk < n:
        raise ValueError(f"maxk must be within 1..{n - 1} for {n} points, got {maxk}")
    distances, indices = NearestNeighbors(n_neighbors=maxk + 1, algorithm="brute").fit(x).kneighbors(x)
    for row in np.nonzero(indices[:, 0] != np.arange(n))[0]:  # rounding put a near-twin before the point
        _put_self_first(row, distances[row], indices[row])
    distances[:, 0] = 0.0
    return distances, indices


def _put_self_first(point: int, distances: np.ndarray, indices: np.ndarray) -> None:
    where = np.nonzero(indices == point)[0]
    at = where[0] if where.size else len(indices) - 1  # absent: it displaces the farthest
    indices[1 : at + 1], distances[1 : at + 1] = indices[:at].copy(), distances[:at].copy()
    indices[0], distances[0] = point, 0.0
