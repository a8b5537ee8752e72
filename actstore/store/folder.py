"""A store in a folder on a local disk: what makes local reads fast and safe (``pread`` on one file
descriptor, ``flock``); every read, by zarr-python or by the fast reader, goes through files.py, which opens
only regular files inside the store's root."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Hashable, Iterable
from pathlib import Path

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from actstore.store.files import open_file, read_key
from actstore.store.location import Location
from actstore.store.lock import FolderLock


class Folder(Location):
    """A store in a local folder."""

    local = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = str(path)

    def zarr_store(self) -> LocalStore:
        return _FolderStore(self.path)

    def _zarr_store_at(self, key: str) -> LocalStore:
        return _FolderStore(self.path / key, read_only=True)

    def exists(self, key: str) -> bool:
        return (self.path / key).exists()

    def version(self, key: str) -> Hashable | None:
        try:
            stat = (self.path / key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def children(self, key: str) -> list[str]:
        folder = self.path / key
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def delete(self, key: str) -> None:
        (self.path / key).unlink(missing_ok=True)

    def clear(self, key: str) -> None:
        folder = self.path / key
        for child in folder.iterdir() if folder.is_dir() else []:
            shutil.rmtree(child) if child.is_dir() else child.unlink()

    def keys_below(self, key: str) -> list[str]:
        return [p.relative_to(self.path).as_posix() for p in (self.path / key).rglob("*") if p.is_file()]

    def size(self, key: str) -> int:
        return sum(p.stat().st_size for p in (self.path / key).rglob("*") if p.is_file())

    def holds_other_things(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def check_writable(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        probe = self.path / ".actstore-write-probe"
        probe.write_bytes(b"")
        probe.unlink()

    def free_bytes(self) -> int:
        """Free space on the disk holding the root (or, before the root exists, its nearest existing parent)."""
        path = self.path.absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free

    def lock(self, key: str, what: str, create: bool = False) -> FolderLock:
        return FolderLock(self.path / key, what, create=create)

    def shard(self, key: str) -> _FileShard:
        return _FileShard(self.url, key)

    def discard_partial_writes(self, key: str) -> None:
        for leftover in (self.path / key).rglob("*.partial"):  # zarr's LocalStore writes these, then renames
            leftover.unlink(missing_ok=True)


class _FileShard:
    """A shard file through one descriptor: its index and its chunks come from the same version even while
    a writer renames a new version into place."""

    def __init__(self, root: str, key: str) -> None:
        self.root, self.key = root, key
        self.version: Hashable | None = None
        self.size: int | None = None
        self._fd = -1

    def __enter__(self) -> _FileShard:
        opened = open_file(self.root, self.key, directory_is_absent=False)
        if opened is None:
            return self
        self._fd, found = opened
        self.version, self.size = (found.st_ino, found.st_mtime_ns, found.st_size), found.st_size
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)

    def tail(self, n: int) -> bytes | None:
        if self._fd < 0:
            return None
        return os.pread(self._fd, min(n, self.size), max(0, self.size - n))

    def range(self, start: int, length: int) -> bytes:
        return os.pread(self._fd, length, start)


class _FolderStore(LocalStore):
    """zarr's LocalStore, reading every key through ``open_file`` (Run's groups, plain zarr reads, xarray,
    Dask workers), so that zarr-python opens only what the fast reader would."""

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if not self._is_open:
            await self._open()
        found = await asyncio.to_thread(read_key, str(self.root), key, byte_range)
        return None if found is None else (prototype or default_buffer_prototype()).buffer.from_bytes(found)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))
