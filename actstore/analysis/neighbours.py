"""Exact Euclidean k-nearest neighbours, in the form DADApy takes precomputed.

On the CPU this is scikit-learn's brute force (chunked, so memory stays bounded, and parallel in C):
measured here it is as fast as anything exact we tried (a NumPy block-and-partition
version ran at half its speed). On an NVIDIA GPU it is the same computation in torch: float64 squared
distances by the same expansion scikit-learn uses, a top-k per block of rows, blocks sized to bound
GPU memory. Each point comes back as its own neighbour 0 at distance 0, which DADApy expects; rows must
be free of exact duplicates (see rows.first_unique_rows).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors

DEVICE_VARIABLE = "ACTSTORE_KNN_DEVICE"  # "cpu", "cuda", "cuda:1", ...: overrides the automatic choice
BLOCK_BYTES = 1 << 30  # the (block, N) float64 distance matrix of one torch step


def knn(x: np.ndarray, maxk: int, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices (N, maxk + 1) of each row's nearest rows, itself first.

    ``device``: "cpu" (scikit-learn), a torch device ("cuda", "cuda:1", or "torch-cpu" for torch on the
    CPU), or None for $ACTSTORE_KNN_DEVICE, else the GPU when there is one, else the CPU.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 0 < maxk < n:
        raise ValueError(f"maxk must be within 1..{n - 1} for {n} points, got {maxk}")
    device = device or os.environ.get(DEVICE_VARIABLE) or default_device()
    if device == "cpu":
        distances, indices = NearestNeighbors(n_neighbors=maxk + 1, algorithm="brute").fit(x).kneighbors(x)
    else:
        distances, indices = _knn_torch(x, maxk, "cpu" if device == "torch-cpu" else device)
    for row in np.nonzero(indices[:, 0] != np.arange(n))[0]:  # rounding put a near-twin before the point
        _put_self_first(row, distances[row], indices[row])
    distances[:, 0] = 0.0
    return distances, indices


@functools.cache
def default_device() -> str:
    """ "cuda" when torch sees a GPU, else "cpu". torch is imported only where an NVIDIA driver is present
    (importing it costs seconds, which a CPU-only worker would pay on its first layer for nothing)."""
    if "torch" not in sys.modules and not Path("/dev/nvidiactl").exists():
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _knn_torch(x: np.ndarray, maxk: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    points = torch.from_numpy(x).to(device)
    squares = (points * points).sum(dim=1)
    n = len(x)
    distances, indices = np.empty((n, maxk + 1)), np.empty((n, maxk + 1), dtype=np.int64)
    block = max(1, BLOCK_BYTES // (8 * n))
    for start in range(0, n, block):
        stop = min(start + block, n)
        squared = squares[start:stop, None] + squares[None, :] - 2.0 * (points[start:stop] @ points.T)
        values, found = torch.topk(squared.clamp_(min=0.0), maxk + 1, dim=1, largest=False, sorted=True)
        distances[start:stop] = values.sqrt_().cpu().numpy()
        indices[start:stop] = found.cpu().numpy()
    return distances, indices


def _put_self_first(point: int, distances: np.ndarray, indices: np.ndarray) -> None:
    where = np.nonzero(indices == point)[0]
    at = where[0] if where.size else len(indices) - 1  # absent: it displaces the farthest
    indices[1 : at + 1], distances[1 : at + 1] = indices[:at].copy(), distances[:at].copy()
    indices[0], distances[0] = point, 0.0
