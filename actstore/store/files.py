"""Reading a folder store's files safely: only regular files inside the store's root are opened (a FIFO
would block the reading thread, a link to ``/dev/zero`` would be read without end, a link to
``/etc/passwd`` would serve another file), without ever opening the refused thing itself, and metadata
files only up to ``MAX_METADATA_BYTES``. What is refused raises RefusedEntry naming the key."""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest

from actstore.store.errors import RefusedEntry
from actstore.store.location import MAX_METADATA_BYTES, is_metadata

log = logging.getLogger(__name__)

# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; O_NOFOLLOW: a link as the last
# component fails (ELOOP) and is resolved and checked first (regular files ignore O_NONBLOCK).
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_FD_PATHS = "/proc/self/fd"  # Linux: the real path of what a descriptor opened, at the cost of one stat
_BY_FD = os.path.isdir(_FD_PATHS)


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
            raise RefusedEntry(
                key,
                root,
                f"a metadata file of {size:,} bytes, above the {MAX_METADATA_BYTES >> 20} MiB any real one takes",
            )
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


_KINDS = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "folder",
}


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
