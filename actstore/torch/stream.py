"""Activations as a torch IterableDataset: shuffled, seeded, resumable, split across workers and ranks.

The order of an epoch is actstore.torch.order's: blocks read whole, dealt to readers, mixed in windows.
With ``batch_size`` the dataset yields whole batches (use ``DataLoader(dataset, batch_size=None)``): a
batch is one gather from the window in memory, much faster than collating thousands of items, and it makes
``start`` exact with DataLoader workers (see ``Activations.__init__``).
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from actstore.pools import ForkSafePool, cores
from actstore.torch.order import EpochPlan, cut, delivered, n_batches
from actstore.torch.sources import LocalSource, RemoteSource

Source = LocalSource | RemoteSource
ITEM_CHUNK = 1024  # rows gathered at once when the dataset yields single items
CAST_ELEMENTS = 32768  # torch copies fewer elements than its grain size in the calling thread
Rows = slice | np.ndarray  # a window's rows in a batch: in order, or picked
KEPT_WINDOWS = 3  # buffers a dataset keeps: the most windows a pass has alive at once
_BLOCKS = ForkSafePool(max_workers=max(2, cores()), thread_name_prefix="actstore-blocks")


class _WindowMemory:
    """The memory of a dataset's windows, kept from one window and one epoch to the next in each process.

    A window is tens to hundreds of MB. glibc takes blocks that large from the kernel afresh and gives them
    back when freed, and the kernel zeroes each page on first touch: a pass decoding into fresh memory spends
    ~10 % of its time clearing pages. So each window is a view of a numpy array made for it over a kept buffer
    (a tensor, at which numpy stops looking for a view's base), and every view of the window refers to that
    array: while any batch cut from a window lives (a sequential pass yields views), its buffer is not reused.
    A pass has at most three windows alive (the one batches are cut from, the one read ahead, and one a
    batch still held refers to), so the dataset keeps that many buffers between epochs and no more.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._buffers: list[tuple[torch.Tensor, weakref.ref[np.ndarray] | None]] = []  # None: free

    def __reduce__(self) -> tuple[type[_WindowMemory], tuple[()]]:
        return _WindowMemory, ()  # a DataLoader worker starts with none

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array, in the smallest free buffer large enough, else in a new one. Every buffer of a
        live window is kept, and free ones, the largest first, while fewer than ``KEPT_WINDOWS`` are held."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self._pid != os.getpid():  # forked: the buffers are the parent's, the lock maybe held by a lost thread
            self._pid, self._lock, self._buffers = os.getpid(), threading.Lock(), []
        with self._lock:
            free = [buffer for buffer, window in self._buffers if not _alive(window)]
            fits = [buffer for buffer in free if len(buffer) >= nbytes]
            buffer = min(fits, key=len) if fits else torch.from_numpy(np.empty(nbytes, np.uint8))  # in huge pages
            window = buffer.numpy()
            live = [(b, w) for b, w in self._buffers if _alive(w)]
            spare = sorted((b for b in free if b is not buffer), key=len, reverse=True)
            spare = spare[: max(0, KEPT_WINDOWS - len(live) - 1)]
            self._buffers = [*live, (buffer, weakref.ref(window)), *((b, None) for b in spare)]
        return window[:nbytes].view(dtype).reshape(shape)


def _alive(window: weakref.ref[np.ndarray] | None) -> bool:
    return window is not None and window() is not None


@dataclass
class _Window:
    """A window's rows in memory: states (row, hidden) or (row, layer, hidden), and each coordinate (row,)."""

    states: np.ndarray
    coords: dict[str, np.ndarray]


class Activations(IterableDataset):
    """The rows of one or more runs (one site, some layers) as dicts of tensors: ``states`` and the row's
    ``sample`` and ``position`` (-1 for rows that are whole questions), the labels asked for (text labels as
    indices into ``categories[name]``), and ``run`` (an index into ``runs``) when there are several runs."""

    def __init__(
        self,
        sources: Sequence[Source],
        one_layer: bool,
        *,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
        buffer_size: int = 65536,
        block_rows: int | None = None,
        drop_last: bool = False,
        start: int = 0,
        epoch: int = 0,
        dtype: torch.dtype | None = torch.float32,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """``buffer_size``: rows mixed at once (memory: about twice that many rows of states and a block, as
        stored or in ``dtype`` where narrower, kept by the dataset for its next epoch). ``block_rows``: rows
        read at once (default: a shard's; through a server, 16 MB of float32 rows, 64 MB without ``shuffle``).
        ``start``: batches (items without ``batch_size``) of this epoch to skip, as a DataLoader hands them
        on: a job restarted after batch k passes ``start=k`` and the same seed, epoch and number of workers,
        and continues with batch k + 1. ``dtype``: of the states (None: as stored). ``rank`` and
        ``world_size``: this process's share (default: torch.distributed's, when initialised); each rank
        reads other blocks."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if start < 0:
            raise ValueError(f"start must be 0 or more, not {start}")
        self.sources = list(sources)
        self.one_layer = one_layer
        self.shuffle, self.seed, self.epoch, self.start = shuffle, seed, epoch, start
        self.batch_size, self.buffer_size, self.drop_last, self.dtype = batch_size, buffer_size, drop_last, dtype
        self.rank, self.world_size = _distributed(rank, world_size)
        self._memory = _WindowMemory()
        self.categories = _shared_categories(self.sources)
        widths = {source.pinned.hidden for source in self.sources}
        if len(widths) > 1:
            raise ValueError(f"the runs' states have different widths ({sorted(widths)}): read them separately")
        self.blocks = [
            (i, lo, lo + size)
            for i, source in enumerate(self.sources)
            for lo, size in cut(source.pinned.n_rows, block_rows or self._block_rows(source))
        ]

    def _block_rows(self, source: Source) -> int:
        """Blocks are the places a shuffled window mixes; in stored order, only how many calls they take counts."""
        return source.pinned.block_rows if self.shuffle else source.pinned.pass_rows

    @property
    def runs(self) -> list[str]:
        return [source.description for source in self.sources]

    @property
    def n_rows(self) -> int:
        """Rows in an epoch, over every rank."""
        return sum(source.pinned.n_rows for source in self.sources)

    def set_epoch(self, epoch: int) -> None:
        """Start another epoch (another order of the rows), from its first batch."""
        self.epoch, self.start = epoch, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers, first = self.world_size * workers, self.rank * workers
        plan = EpochPlan(
            tuple(hi - lo for _, lo, hi in self.blocks), self.buffer_size, self.shuffle, self.seed, self.epoch
        )
        per_batch = self.batch_size or 1
        counts = [
            n_batches(sum(plan.window_sizes(first + w, readers)), per_batch, self.drop_last) for w in range(workers)
        ]
        # A resumed DataLoader begins its turns at worker 0 again: worker i plays the part of the worker whose
        # turn is i-th from the stopping point, so the batches come in the order they would have.
        taken, turn = delivered(counts, self.start)
        part = (turn + worker) % workers
        batches = self._batches(plan, first + part, readers, taken[part] * per_batch, self.batch_size or ITEM_CHUNK)
        if self.batch_size is not None:
            yield from batches
            return
        for batch in batches:
            for i in range(len(batch["states"])):
                yield {name: values[i] for name, values in batch.items()}

    def _batches(
        self, plan: EpochPlan, reader: int, readers: int, skip: int, size: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``size`` rows of ``reader``'s share, from its row ``skip`` on."""
        windows = plan.windows(reader, readers)
        sizes = plan.window_sizes(reader, readers)
        first = 0
        while first < len(windows) and skip >= sizes[first]:
            skip -= sizes[first]
            first += 1
        pieces: list[tuple[_Window, Rows]] = []
        pending = 0
        memory = self._memory
        with ThreadPoolExecutor(1, thread_name_prefix="actstore-feed") as pool:
            ahead: Future[_Window] | None = None
            for w in range(first, len(windows)):
                window = ahead.result() if ahead is not None else self._read(windows[w], memory)
                ahead = pool.submit(self._read, windows[w + 1], memory) if w + 1 < len(windows) else None
                order = plan.row_order(sizes[w], reader, w) if self.shuffle else None
                at, skip = skip, 0
                while at < sizes[w]:
                    n = min(size - pending, sizes[w] - at)
                    pieces.append((window, slice(at, at + n) if order is None else order[at : at + n]))
                    pending, at = pending + n, at + n
                    if pending == size:
                        yield self._gather(pieces)
                        pieces, pending = [], 0
        if pieces and not (self.drop_last and self.batch_size is not None):
            yield self._gather(pieces)

    def _read(self, blocks: np.ndarray, memory: _WindowMemory) -> _Window:
        """A window's blocks, read whole (several at once) into one array of ``memory``, cast to the dtype asked
        for."""
        parts = [self.blocks[b] for b in blocks]
        at = np.cumsum([0] + [hi - lo for _, lo, hi in parts])
        source = self.sources[0]
        dtype = self._window_dtype()
        width = (source.pinned.hidden,) if self.one_layer else (len(source.spec.layers), source.pinned.hidden)
        states = memory.empty((at[-1], *width), dtype)

        def fill(k: int) -> dict[str, np.ndarray]:
            i, lo, hi = parts[k]
            place = states[at[k] : at[k + 1]]
            if self.one_layer and place.dtype == np.dtype(self.sources[i].pinned.dtype):
                rows = self.sources[i].read(lo, hi, out=place[np.newaxis])  # decoded in place: no copy
            else:
                rows = self.sources[i].read(lo, hi)
                _cast(
                    torch.from_numpy(place),
                    torch.from_numpy(rows.states[0] if self.one_layer else rows.states.transpose(1, 0, 2)),
                )
            return {**rows.coords, "run": np.full(hi - lo, i)} if len(self.sources) > 1 else rows.coords

        coords = list(_BLOCKS.map(fill, range(len(parts))))
        return _Window(states, {name: np.concatenate([c[name] for c in coords]) for name in coords[0]})

    def _window_dtype(self) -> np.dtype:
        """What a window holds: the stored dtype, or the one asked for where narrower. A batch is cast after its
        gather, which so moves half the bytes for float16 states read as float32, and blocks of one layer are
        decoded straight into the window."""
        stored = np.result_type(*(np.dtype(source.pinned.dtype) for source in self.sources))
        wanted = stored if self.dtype is None else _numpy(self.dtype)
        return wanted if wanted.itemsize < stored.itemsize else stored

    def _gather(self, pieces: list[tuple[_Window, Rows]]) -> dict[str, torch.Tensor]:
        """One batch: the rows ``pieces`` name, of one window or (at a window's end) two; a slice of rows in
        order is a view."""
        batch = {name: _take([(window.coords[name], rows) for window, rows in pieces]) for name in pieces[0][0].coords}
        states = _take([(window.states, rows) for window, rows in pieces])
        batch["states"] = states if self.dtype is None or states.dtype == self.dtype else _converted(states, self.dtype)
        return batch


def _cast(out: torch.Tensor, values: torch.Tensor) -> None:
    """``out[...] = values``, through torch's F16C casts (~4x numpy's from float16) in pieces below torch's grain
    size: it runs each in this thread, as a window's blocks are cast in several threads at once."""
    step = max(1, CAST_ELEMENTS // math.prod(values.shape[1:]))
    for i in range(0, len(values), step):
        out[i : i + step].copy_(values[i : i + step])


def _converted(states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``states.to(dtype)``, cast in halves on two of the block threads. torch would cast on its OpenMP threads,
    which spin for a while after each operation and so keep a core from the threads decoding the next window:
    a shuffled pass took ~20 % more CPU and ~10 % more time so (docs/benchmarks.md, "Feed")."""
    out = torch.empty(states.shape, dtype=dtype)
    half = max(1, -(-len(states) // 2))
    list(_BLOCKS.map(lambda lo: _cast(out[lo : lo + half], states[lo : lo + half]), range(0, len(states), half)))
    return out


def _take(pieces: list[tuple[np.ndarray, Rows]]) -> torch.Tensor:
    """The rows of each array, side by side (np.take: several times faster here than torch's indexing)."""
    parts = [values[rows] if isinstance(rows, slice) else np.take(values, rows, axis=0) for values, rows in pieces]
    return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))


def _numpy(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a window holds for states of ``dtype`` (float32 where numpy has none: bfloat16)."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        return np.dtype("float32")


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's rank and the number of ranks: as given, else torch.distributed's, else (0, 1)."""
    if rank is None and world_size is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return rank, world_size


def _shared_categories(sources: Sequence[Source]) -> dict[str, list[str]]:
    """Text labels' values over every run, so an index means the same value in every run's rows."""
    merged: dict[str, set[str]] = {}
    for source in sources:
        for name, values in source.pinned.categories.items():
            merged.setdefault(name, set()).update(values)
    categories = {name: sorted(values) for name, values in merged.items()}
    for source in sources:
        source.pinned.categories = categories
    return categories
