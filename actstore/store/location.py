"""Where a store's bytes live: the interface every location kind offers (a folder: folder.py; a prefix in
an S3-compatible bucket: bucket.py; which one a URL names: url.py).

The rest of ``actstore.store`` reaches bytes only through a :class:`Location`: zarr opens groups on its
``zarr_store``, the fast reader fetches shard bytes through ``shard``, writers take ``lock``. Keys are
``/``-separated paths below the store's root, as zarr's store API has them ("" is the root). Metadata
documents are read only up to ``MAX_METADATA_BYTES`` in every location, so one damaged run never costs
more than its own reads.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import Protocol

import xarray as xr
import zarr

from actstore.store.errors import StoreError

METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})
MAX_METADATA_BYTES = 16 << 20  # a run's zarr.json takes tens of KiB: one this large is damage, not a run


class UnsupportedLocation(StoreError, ValueError):
    """A store URL whose scheme actstore cannot store runs in."""


class Lock(Protocol):
    def check(self) -> None:
        """Raise RunLocked if the lock was lost meanwhile (a bucket's lease taken over after expiring)."""

    def release(self) -> None: ...


class ShardBytes(Protocol):
    """One shard file or object, open for reading its tail (the index) and ranges of it (the chunks).

    ``version`` identifies what was opened when the location can say so cheaply (a file's inode, mtime and
    size), else None; ``size`` likewise. ``tail`` returns None when the shard does not exist."""

    version: Hashable | None
    size: int | None

    def tail(self, n: int) -> bytes | None: ...

    def range(self, start: int, length: int) -> bytes: ...


def join(*parts: str) -> str:
    """A key from its parts, empty parts skipped."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def is_metadata(key: str) -> bool:
    """Whether ``key`` names a Zarr metadata document (read whole, so read through a size cap)."""
    return key.rpartition("/")[2] in METADATA_NAMES


class Location(ABC):
    """The root of one store; see the module docstring."""

    url: str
    local: bool  # reads cost a syscall, not a round trip: the reader reads small requests serially

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @abstractmethod
    def zarr_store(self) -> zarr.abc.store.Store:
        """The root as a writable zarr store."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def version(self, key: str) -> Hashable | None:
        """Changes whenever ``key`` is replaced (commits replace whole files and objects); None if absent."""

    @abstractmethod
    def children(self, key: str) -> list[str]:
        """Names of the folders (common prefixes) directly below ``key``, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the file or object ``key`` if it exists."""

    @abstractmethod
    def clear(self, key: str) -> None:
        """Delete everything below ``key``; a folder at ``key`` itself is kept (a writer may hold its lock)."""

    @abstractmethod
    def keys_below(self, key: str) -> list[str]:
        """Every file or object below ``key``, as keys."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Bytes stored below ``key``."""

    @abstractmethod
    def holds_other_things(self) -> bool:
        """Whether the root exists and holds anything (a folder given for a new store must be empty)."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise OSError unless a write and a delete at the root succeed."""

    @abstractmethod
    def lock(self, key: str, what: str, create: bool = False) -> Lock:
        """The exclusive writer lock of ``key`` (a run), or RunLocked naming ``what``."""

    @abstractmethod
    def shard(self, key: str) -> ShardBytes:
        """``key`` opened for reading; use as a context manager."""

    def discard_partial_writes(self, key: str) -> None:
        """Remove what an interrupted write left below ``key`` (none: object writes are atomic)."""

    def free_bytes(self) -> int | None:
        """Bytes that can still be written at the root, or None where there is no such limit to read (a bucket)."""
        return None

    def open_xarray(self, group: str) -> xr.Dataset:
        """The group as xarray opens it from this location (lazily), with the group's consolidated metadata:
        opened as the root of its own store, since xarray looks for consolidated metadata at the root (which
        a store does not keep: it would hold every run's shapes as of one moment). Runs written before
        finished runs kept theirs open without it, quietly."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated metadata")
            return xr.open_zarr(self._zarr_store_at(group))

    @abstractmethod
    def _zarr_store_at(self, key: str) -> zarr.abc.store.Store:
        """A read-only zarr store whose root is ``key``."""
