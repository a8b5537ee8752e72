"""A store below a prefix in an S3-compatible bucket: zarr's own ``FsspecStore`` over s3fs, with byte-range
GETs, and a lease made of conditional writes (lease.py) as the writer lock."""

from __future__ import annotations

import atexit
import os
from collections.abc import Hashable
from typing import Any

from zarr.abc.store import ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from actstore.store.errors import RefusedEntry, StoreError
from actstore.store.location import MAX_METADATA_BYTES, Location, Lock, UnsupportedLocation, is_metadata, join

LEASES = ".actstore-leases"  # a bucket's leases, at its top level: outside any store below a prefix
LEASE_SECONDS_ENV = "ACTSTORE_LEASE_SECONDS"


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

    def shard(self, key: str) -> _ObjectShard:
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


class _ObjectShard:
    """A shard object read with byte-range GETs through zarr's store API; each GET sees the object as it is
    then (a writer may have replaced it in between: the reader checks and retries, see StateReader)."""

    version = None
    size = None

    def __init__(self, store: FsspecStore, key: str) -> None:
        self._store, self._key = store, key

    def __enter__(self) -> _ObjectShard:
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
