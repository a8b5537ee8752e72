"""Preparing a layer's rows for density analysis: the sample mask and exact duplicates.

Identical rows make DADApy's distance ratios infinite (ID and density break), and DADApy's own
``remove_identical_points`` reorders the points, losing the alignment with labels. Here duplicates
are dropped keeping the first occurrence and the original order, and what was dropped is reported.
"""

from __future__ import annotations

import numpy as np


def first_unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept, dropped) row indices of ``x``: kept ascending, each the first of its identical rows.

    Rows are grouped by a hash of their bytes (far faster than sorting whole rows), then every row is
    compared with the first row of its group, so a hash collision can never merge different rows.
    """
    rows = np.ascontiguousarray(x)
    hashes = np.fromiter((hash(row.tobytes()) for row in rows), dtype=np.int64, count=len(rows))
    _, first, group = np.unique(hashes, return_index=True, return_inverse=True)
    if not (rows == rows[first[group]]).all():  # a collision: fall back to comparing whole rows
        _, first = np.unique(
            rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel(), return_index=True
        )
    kept = np.sort(first)
    dropped = np.setdiff1d(np.arange(len(rows)), kept, assume_unique=True)
    return kept, dropped


def per_subject_mask(subjects: np.ndarray, cap: int) -> np.ndarray:
    """Positions of the first ``cap`` samples of each subject, in stored order (the study's mask: 200)."""
    seen: dict[str, int] = {}
    keep = []
    for position, subject in enumerate(subjects):
        if seen.get(subject, 0) < cap:
            seen[subject] = seen.get(subject, 0) + 1
            keep.append(position)
    return np.asarray(keep, dtype=np.int64)
