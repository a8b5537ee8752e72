"""Exact Euclidean k-nearest neighbours in bounded memory, in the form DADApy takes precomputed.

Blocks of rows against all rows: squared distances by the ``|x|^2 + |y|^2 - 2 x.y`` expansion in
float64 (one BLAS product per block, as scikit-learn's brute force does), the ``maxk`` smallest by
partial sort, then sorted. Each point is its own neighbour 0 at distance 0, as DADApy expects.
"""

from __future__ import annotations

import numpy as np

BLOCK_BYTES = 64 << 20  # distance block held at once: rows x N float64


def knn(x: np.ndarray, maxk: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices (N, maxk + 1) of each row's nearest rows, itself first."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 0 < maxk < n:
        raise ValueError(f"maxk must be within 1..{n - 1} for {n} points, got {maxk}")
    norms = np.einsum("ij,ij->i", x, x)
    distances = np.empty((n, maxk + 1), dtype=np.float64)
    indices = np.empty((n, maxk + 1), dtype=np.int64)
    rows = max(1, BLOCK_BYTES // (8 * n))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = norms[start:stop, None] + norms[None, :] - 2.0 * (x[start:stop] @ x.T)
        block[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # self first, whatever rounding says
        nearest = np.argpartition(block, maxk, axis=1)[:, : maxk + 1]
        picked = np.take_along_axis(block, nearest, axis=1)
        order = np.argsort(picked, axis=1, kind="stable")
        indices[start:stop] = np.take_along_axis(nearest, order, axis=1)
        distances[start:stop] = np.sqrt(np.maximum(np.take_along_axis(picked, order, axis=1), 0.0))
    distances[:, 0] = 0.0
    return distances, indices
