"""Thread pools that survive ``fork`` (the store's readers and writers, the client's decoding, the feed).

Threads do not survive a fork, but a ThreadPoolExecutor copied into the child still counts its idle threads
and queues work for them: the first read in a forked DataLoader worker, or a Dask worker forked from a
process that had read, would wait forever. A pool here is made again in a forked child on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def cores() -> int:
    """The CPU cores this process may run on: its affinity, which ``taskset`` and a container's cpuset set (a CPU
    quota, as ``docker --cpus`` sets, is not seen); else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ForkSafePool:
    """A ThreadPoolExecutor of ``max_workers`` threads, made on first use in each process."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self._args = {"max_workers": max_workers, "thread_name_prefix": thread_name_prefix}
        self._made: tuple[int, ThreadPoolExecutor] | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        return self._pool().submit(fn, *args, **kwargs)

    def map(self, fn: Callable[..., T], *iterables: Iterable[Any]) -> Iterator[T]:
        return self._pool().map(fn, *iterables)

    def _pool(self) -> ThreadPoolExecutor:
        made = self._made
        if made is not None and made[0] == os.getpid():
            return made[1]
        with self._lock:
            if self._made is None or self._made[0] != os.getpid():
                self._made = (os.getpid(), ThreadPoolExecutor(**self._args))
            return self._made[1]

    def _forget(self) -> None:
        """In a forked child: the copied lock may be held by a thread that no longer exists, the pool is dead."""
        self._lock = threading.Lock()
        self._made = None
