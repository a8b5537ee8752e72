"""Where a store's bytes live: a folder on a local disk, or a prefix in an S3-compatible bucket.

The rest of ``actstore.store`` reaches bytes only through a :class:`Location`: zarr opens groups on its
``zarr_store``, the fast reader fetches shard bytes through ``shard``, writers take ``lock``. A folder keeps
what makes local reads fast and safe (``pread`` on one file descriptor, ``flock``); a bucket goes through
zarr's own ``FsspecStore`` over s3fs, with byte-range GETs, and a lease made of conditional writes
(lease.py). Any other URL scheme is refused: ``gs://x`` or ``s3:/x`` must not become a local folder named
after it.

Keys are ``/``-separated paths below the store's root, as zarr's store API has them ("" is the root).

Every read of a folder's files, by zarr-python or by the fast reader, goes through ``open_file``: the store
opens only regular files inside its root (a FIFO would block the reading thread, a link to ``/dev/zero``
would be read without end, a link to ``/etc/passwd`` would serve another file), without ever opening the
refused thing itself; and metadata files are read only up to ``MAX_METADATA_BYTES``, in buckets too. What
is refused raises RefusedEntry naming the key, so one damaged run never costs more than its own reads.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import functools
import logging
import os
import shutil
import stat
import warnings
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, Protocol

import xarray as xr
import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from actstore.store.errors import RefusedEntry, StoreError
from actstore.store.lock import FolderLock

log = logging.getLogger(__name__)

SCHEMES = ("s3",)
LEASES = ".actstore-leases"  # a bucket's leases, at its top level: outside any store below a prefix
LEASE_SECONDS_ENV = "ACTSTORE_LEASE_SECONDS"
METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})
MAX_METADATA_BYTES = 16 << 20  # a run's zarr.json takes tens of KiB: one this large is damage, not a run
# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; O_NOFOLLOW: a link as the last
# component fails (ELOOP) and is resolved and checked first (regular files ignore O_NONBLOCK).
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_FD_PATHS = "/proc/self/fd"  # Linux: the real path of what a descriptor opened, at the cost of one stat
_BY_FD = os.path.isdir(_FD_PATHS)


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


def locate(root: str | os.PathLike[str] | Location, storage_options: dict[str, Any] | None = None) -> Location:
    """The location ``root`` names: ``s3://bucket/prefix`` or a folder path (also ``file://``)."""
    if isinstance(root, Location):
        return root
    text = os.fspath(root)
    scheme, sep, rest = text.partition("://")
    if not sep:
        if text.startswith("s3:"):  # a slash missing: refused rather than taken for a folder named "s3:"
            raise UnsupportedLocation(f"store {text!r}: write s3://bucket/prefix")
        return Folder(Path(text))
    if scheme == "file":
        return Folder(Path(rest))
    if scheme == "s3":
        bucket, _, prefix = rest.strip("/").partition("/")
        if not bucket:
            raise UnsupportedLocation(f"store {text!r} names no bucket: write s3://bucket/prefix")
        return Bucket(bucket, prefix.strip("/"), storage_options or {})
    raise UnsupportedLocation(f"store {text!r}: unsupported scheme {scheme}://; a store is a folder or "
                              f"s3://bucket/prefix (any S3-compatible service, endpoint from AWS_ENDPOINT_URL)")


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

    def lock(self, key: str, what: str, create: bool = False) -> FolderLock:
        return FolderLock(self.path / key, what, create=create)

    def shard(self, key: str) -> "_FileShard":
        return _FileShard(self.url, key)

    def discard_partial_writes(self, key: str) -> None:
        for leftover in (self.path / key).rglob("*.partial"):  # zarr's LocalStore writes these, then renames
            leftover.unlink(missing_ok=True)


class Bucket(Location):
    """A store below ``prefix`` in an S3 bucket, through s3fs (zarr's fsspec backend for S3).

    Credentials and endpoint come as for any AWS client (environment, ``AWS_ENDPOINT_URL``, config files),
    or from ``storage_options`` (s3fs's keyword arguments). Listings are never cached: other writers and
    server replicas change the bucket.
    """

    local = False

    def __init__(self, bucket: str, prefix: str, storage_options: dict[str, Any]) -> None:
        try:
            import s3fs
        except ImportError:
            raise UnsupportedLocation("stores in S3 buckets need s3fs: pip install 'actstore[s3]'") from None
        self.bucket, self.prefix = bucket, prefix
        self.storage_options = {"use_listings_cache": False, **storage_options}
        self.url = f"s3://{join(bucket, prefix)}"
        self.fs = s3fs.S3FileSystem(**self.storage_options)
        reads = s3fs.S3FileSystem(asynchronous=True, **self.storage_options)
        self._store = _BucketStore(reads, path=join(bucket, prefix))
        _OPEN_FILESYSTEMS.update((self.fs, reads))  # s3fs reuses one instance per set of options

    def _path(self, key: str) -> str:
        return join(self.bucket, self.prefix, key)

    def zarr_store(self) -> FsspecStore:
        return self._store

    def _zarr_store_at(self, key: str) -> FsspecStore:
        return _BucketStore(self._store.fs, path=self._path(key), read_only=True)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def version(self, key: str) -> Hashable | None:
        try:
            return self.fs.info(self._path(key))["ETag"]
        except FileNotFoundError:
            return None

    def children(self, key: str) -> list[str]:
        try:
            entries = self.fs.ls(self._path(key), detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    def clear(self, key: str) -> None:
        found = [self._path(k) for k in self.keys_below(key)]
        if found:
            self.fs.rm(found)  # DeleteObjects, up to 1,000 keys a request

    def keys_below(self, key: str) -> list[str]:
        root = join(self.bucket, self.prefix)
        return [p.removeprefix(root).lstrip("/") for p in self.fs.find(self._path(key))]

    def size(self, key: str) -> int:
        return int(self.fs.du(self._path(key)))

    def holds_other_things(self) -> bool:
        try:
            found = self.fs.ls(self._path(""))
        except FileNotFoundError:
            return False
        return any(p.rsplit("/", 1)[-1] != LEASES for p in found)  # a store at a bucket's top holds the leases

    def check_writable(self) -> None:
        probe = self._path(".actstore-write-probe")
        self.fs.pipe_file(probe, b"")
        self.fs.rm_file(probe)

    def lock(self, key: str, what: str, create: bool = False) -> Lock:
        """A lease (lease.py) of ``ACTSTORE_LEASE_SECONDS`` (60 by default): how long a writer killed with
        ``kill -9`` keeps others out; the writer renews it every third of that while it lives."""
        from actstore.store.lease import ObjectLease

        return ObjectLease(self.fs, join(self.bucket, LEASES, self.prefix, key), what, ttl=_lease_seconds())

    def shard(self, key: str) -> "_ObjectShard":
        return _ObjectShard(self._store, key)


_OPEN_FILESYSTEMS: set[Any] = set()


@atexit.register
def _close_sessions() -> None:
    """Close the S3 clients' HTTP sessions while their event loops still run (at exit, before zarr stops its
    loop): left to the garbage collector, each prints "Unclosed client session" as the program ends."""
    for fs in _OPEN_FILESYSTEMS:
        client = getattr(fs, "_s3", None)
        if client is not None:
            loop = fs.loop if fs.loop is not None and fs.loop.is_running() else _zarr_loop()
            fs.close_session(loop, client)


def _zarr_loop() -> Any:
    from zarr.core.sync import _get_loop

    return _get_loop()


def _lease_seconds() -> float:
    text = os.environ.get(LEASE_SECONDS_ENV, "60")
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise StoreError(f"{LEASE_SECONDS_ENV}={text!r}: give the writer lease's length in seconds, above 0")
    return seconds


class _FileShard:
    """A shard file through one descriptor: its index and its chunks come from the same version even while
    a writer renames a new version into place."""

    def __init__(self, root: str, key: str) -> None:
        self.root, self.key = root, key
        self.version: Hashable | None = None
        self.size: int | None = None
        self._fd = -1

    def __enter__(self) -> "_FileShard":
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


class _ObjectShard:
    """A shard object read with byte-range GETs through zarr's store API; each GET sees the object as it is
    then (a writer may have replaced it in between: the reader checks and retries, see StateReader)."""

    version = None
    size = None

    def __init__(self, store: FsspecStore, key: str) -> None:
        self._store, self._key = store, key

    def __enter__(self) -> "_ObjectShard":
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def tail(self, n: int) -> bytes | None:
        found = sync(self._store.get(self._key, default_buffer_prototype(), SuffixByteRequest(n)))
        return None if found is None else found.to_bytes()

    def range(self, start: int, length: int) -> bytes:
        found = sync(self._store.get(self._key, default_buffer_prototype(), RangeByteRequest(start, start + length)))
        return b"" if found is None else found.to_bytes()


class _BucketStore(FsspecStore):
    """zarr's FsspecStore, reading metadata objects with a bounded range: an object named zarr.json of
    gigabytes is refused after MAX_METADATA_BYTES + 1 bytes instead of being read whole into memory."""

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is not None or not is_metadata(key):
            return await super().get(key, prototype, byte_range)
        found = await super().get(key, prototype, RangeByteRequest(0, MAX_METADATA_BYTES + 1))
        if found is not None and len(found) > MAX_METADATA_BYTES:
            raise RefusedEntry(key, self.path, f"a metadata object above {MAX_METADATA_BYTES >> 20} MiB")
        return found


class _FolderStore(LocalStore):
    """zarr's LocalStore, reading every key through ``open_file`` (Run's groups, plain zarr reads, xarray,
    Dask workers), so that zarr-python opens only what the fast reader would."""

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        found = await asyncio.to_thread(read_key, str(self.root), key, byte_range)
        return None if found is None else (prototype or default_buffer_prototype()).buffer.from_bytes(found)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))


def is_metadata(key: str) -> bool:
    """Whether ``key`` names a Zarr metadata document (read whole, so read through a size cap)."""
    return key.rpartition("/")[2] in METADATA_NAMES


def read_key(root: str, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
    """The bytes of ``key`` below the folder ``root`` (``byte_range`` of them, as zarr's LocalStore reads it),
    or None when absent; RefusedEntry for what ``open_file`` refuses and for metadata above the cap."""
    opened = open_file(root, key)
    if opened is None:
        return None
    fd, found = opened
    try:
        size = found.st_size
        if byte_range is None and is_metadata(key) and size > MAX_METADATA_BYTES:
            raise RefusedEntry(key, root, f"a metadata file of {size:,} bytes, above the "
                                          f"{MAX_METADATA_BYTES >> 20} MiB any real one takes")
        start, stop = _span(byte_range, size)
        return _pread_all(fd, start, stop)
    finally:
        os.close(fd)


def open_file(root: str, key: str, directory_is_absent: bool = True) -> tuple[int, os.stat_result] | None:
    """A descriptor open for reading the regular file ``key`` below the folder ``root``, with its stat; None
    when there is no such file (or, with ``directory_is_absent``, a folder there, as zarr's LocalStore has
    it). Raises RefusedEntry for a path that leads out of the root (through a link anywhere along it) and
    for anything but a regular file, before reading a byte and without waiting on a FIFO.

    What was opened is checked, not the path before it: its real path comes from the descriptor (Linux's
    /proc/self/fd; elsewhere the path is resolved again), so a link swapped in meanwhile is caught too."""
    path = f"{root}/{key}"
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        path = os.path.realpath(path)
        fd = _open_link(root, key, path)
        if fd is None:
            return None
    return _checked(fd, root, key, path, directory_is_absent)


def _open_link(root: str, key: str, real: str) -> int | None:
    """A descriptor for ``real``, where the link at ``key`` leads, if that is inside the root (checked before
    opening: a device outside is never opened); None for a dangling link."""
    _check_inside(root, key, real)
    try:
        return os.open(real, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedEntry(key, root, "a link that changed while it was opened") from None
        raise


def _checked(fd: int, root: str, key: str, path: str, directory_is_absent: bool) -> tuple[int, os.stat_result] | None:
    """``fd`` with its stat if it is a regular file inside the root; else closed, and None for a folder taken
    as absent, RefusedEntry for the rest."""
    try:
        found = os.fstat(fd)
        _check_inside(root, key, os.readlink(f"{_FD_PATHS}/{fd}") if _BY_FD else os.path.realpath(path))
        if _is_regular(found, key, root, directory_is_absent):
            return fd, found
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _check_inside(root: str, key: str, real: str) -> None:
    inside = _real_root(root)
    if real != inside and not real.startswith(inside.rstrip("/") + "/"):
        log.debug("refused %s in store %s: it leads to %s, outside the store's root", key, root, real)
        raise RefusedEntry(key, root, "a link leading out of the store's root")


def _is_regular(found: os.stat_result, key: str, root: str, directory_is_absent: bool) -> bool:
    """True for a regular file, False for a folder taken as absent; RefusedEntry for anything else."""
    if stat.S_ISREG(found.st_mode):
        return True
    if stat.S_ISDIR(found.st_mode) and directory_is_absent:
        return False
    raise RefusedEntry(key, root, f"a {_KINDS.get(stat.S_IFMT(found.st_mode), 'special file')}, not a regular file")


_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
          stat.S_IFSOCK: "socket", stat.S_IFDIR: "folder"}


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    """The root with its links resolved (a store may live behind a link, e.g. /data -> /mnt/disk)."""
    return os.path.realpath(root)


def _span(byte_range: ByteRequest | None, size: int) -> tuple[int, int]:
    """(start, stop) of ``byte_range`` in a file of ``size`` bytes, as zarr's LocalStore reads it."""
    if byte_range is None:
        return 0, size
    if isinstance(byte_range, RangeByteRequest):
        return byte_range.start, byte_range.end
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise TypeError(f"unexpected byte_range {byte_range!r}")


def _pread_all(fd: int, start: int, stop: int) -> bytes:
    """Bytes ``start:stop`` of the file, fewer at its end; one pread returns at most ~2 GiB on Linux. (A join
    of one part returns that part, uncopied.)"""
    parts = []
    while start < stop:
        part = os.pread(fd, stop - start, start)
        if not part:
            break
        parts.append(part)
        start += len(part)
    return b"".join(parts)
