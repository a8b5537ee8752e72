"""Which rows each reader of an epoch takes, and in which order: computed alike in every process, so that
DataLoader workers and distributed ranks split a run without talking to each other, and a restarted job can
recompute where it stopped.

A run's rows (tokens, or samples) are cut into blocks, each read whole (by default a shard's rows: one read
of consecutive bytes). An epoch shuffles the blocks (seeded by the seed and the epoch) and deals them in turn
to the readers (every DataLoader worker of every rank). Each reader groups its blocks into windows of about
``buffer_size`` rows, reads a window, and yields its rows in a random order seeded by the seed, the epoch,
the reader and the window. So a batch mixes tokens of many places in the run (as far apart as the windows'
blocks), memory holds one window (two while the next is read ahead), and each read is a whole block, the
fast way to read chunked storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cut(n_rows: int, block_rows: int) -> list[tuple[int, int]]:
    """The (first row, rows) of the blocks ``n_rows`` rows are cut into."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, not {block_rows}")
    return [(lo, min(block_rows, n_rows - lo)) for lo in range(0, n_rows, block_rows)]


@dataclass(frozen=True)
class EpochPlan:
    """The order of one epoch's blocks (of ``block_sizes`` rows each) and rows over ``readers`` readers."""

    block_sizes: tuple[int, ...]
    buffer_rows: int
    shuffle: bool
    seed: int
    epoch: int

    def __post_init__(self) -> None:
        if self.buffer_rows < 1:
            raise ValueError(f"buffer_size must be at least 1 row, not {self.buffer_rows}")

    def windows(self, reader: int, readers: int) -> list[np.ndarray]:
        """The blocks ``reader`` (0-based, of ``readers``) reads, grouped into the windows it reads at once:
        consecutive blocks of its share until a window holds ``buffer_rows`` rows."""
        n = len(self.block_sizes)
        order = self._rng().permutation(n) if self.shuffle else np.arange(n)
        windows, current, rows = [], [], 0
        for block in order[reader::readers]:
            current.append(block)
            rows += self.block_sizes[block]
            if rows >= self.buffer_rows:
                windows.append(np.array(current))
                current, rows = [], 0
        return windows + ([np.array(current)] if current else [])

    def window_sizes(self, reader: int, readers: int) -> list[int]:
        return [sum(self.block_sizes[b] for b in window) for window in self.windows(reader, readers)]

    def row_order(self, n: int, reader: int, window: int) -> np.ndarray:
        """The order in which a shuffled window's ``n`` rows (as read, block after block) are yielded."""
        return np.random.default_rng([self.seed, self.epoch, reader, window, 1]).permutation(n)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, 0])


def n_batches(rows: int, batch_size: int, drop_last: bool) -> int:
    return rows // batch_size if drop_last else -(-rows // batch_size)


def delivered(counts: list[int], k: int) -> tuple[list[int], int]:
    """How many of the first ``k`` batches a DataLoader took from each worker, given how many each worker
    yields (``counts``), and whose turn comes next: the DataLoader takes one batch of each worker in turn,
    skipping workers that are done, and hands them on in that order."""
    if k > sum(counts):
        raise ValueError(f"cannot start after batch {k}: the epoch has {sum(counts)} batches")
    taken = [0] * len(counts)
    while k:
        active = [w for w, count in enumerate(counts) if taken[w] < count]
        rounds = min(k // len(active), min(counts[w] - taken[w] for w in active))
        if rounds == 0:  # fewer batches left than active workers: the first k of them each give one
            for w in active[:k]:
                taken[w] += 1
            return taken, active[k]
        for w in active:
            taken[w] += rounds
        k -= rounds * len(active)
    return taken, 0
