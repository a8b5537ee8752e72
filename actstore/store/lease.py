"""An exclusive writer lease on a run kept in an S3-compatible bucket: the bucket's ``FolderLock``.

A bucket has no ``flock`` and nothing that notices a dead writer, so the lock is a small object whose
every change is a conditional write, and whose holder must keep renewing it:

* acquire: ``PutObject`` with ``If-None-Match: *``; the store creates it for exactly one writer.
* renew: a daemon thread rewrites it every ``ttl / 3`` with ``If-Match: <our last ETag>``. Every
  version names a renewal count, so no two versions share an ETag and an old one cannot match again.
* stale: a lease not renewed for ``ttl + margin``, judged from the object's ``LastModified`` and the
  ``Date`` header of the same ``HeadObject`` reply: both the server's clock, so the writers' clocks may
  disagree with it and with each other (both headers are whole seconds; ``margin`` covers that).
* break: ``DeleteObject`` with ``If-Match: <the stale ETag>``, then the ordinary create. Of several
  breakers at most one delete matches, and the create decides between whoever comes next; a holder
  that renewed meanwhile changed the ETag, so its lease survives.
* lost: a renewal or :meth:`ObjectLease.check` that finds another ETag (or none) means someone broke
  the lease; the writer learns it at its next commit, which ``check`` refuses. A holder that could not
  renew for ``ttl`` (its own clock) also stops trusting its lease, before any breaker may take it.

It relies on the store's strong read-after-write consistency and on conditional ``PutObject``
(``If-None-Match``, ``If-Match``) and ``DeleteObject`` (``If-Match``), as AWS S3 (and moto) offer;
another S3-compatible store must be checked first: one that ignores these headers lets two writers in.
A reply without a ``Date`` header falls back to the local clock, which must then agree with the
server's. Like every lease it assumes that a holder is not frozen for longer than ``ttl`` between its
last ``check`` and the end of its commit. A writer killed by SIGKILL stops renewing, so its run is
free again ``ttl + margin`` (plus at most a second) later.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from actstore.store.errors import RunLocked

if TYPE_CHECKING:
    import s3fs

logger = logging.getLogger(__name__)

_ATTEMPTS = 3  # creates tried while other writers delete and create the same lease


@dataclass(frozen=True)
class _Seen:
    """The lease object as one ``HeadObject`` reply showed it."""

    etag: str
    info: dict[str, Any]  # what its holder wrote; empty for an object no ObjectLease wrote
    modified: datetime
    server_now: datetime

    def expires(self, ttl: float, margin: float) -> datetime:
        return self.modified + timedelta(seconds=float(self.info.get("ttl", ttl)) + margin)

    def describe(self, ttl: float, margin: float) -> str:
        until = self.expires(ttl, margin).astimezone(UTC)
        return (
            f"holder {self.info.get('holder', '?')} on {self.info.get('host', '?')}, pid "
            f"{self.info.get('pid', '?')}, lease until {until:%Y-%m-%d %H:%M:%S} UTC"
        )


class ObjectLease:
    """Exclusive writer lease on one run in a bucket (the analogue of FolderLock).

    ``key`` is ``"bucket/path/of/lease-object"``, ``what`` names the run in messages. Acquiring raises
    :class:`RunLocked` while another writer holds a lease that has not expired; an expired one is
    broken (with a warning that names its holder) and taken over.
    """

    def __init__(self, fs: s3fs.S3FileSystem, key: str, what: str, ttl: float = 60.0, margin: float = 2.0) -> None:
        if ttl <= 0 or margin < 0:
            raise ValueError(f"a lease needs ttl > 0 and margin >= 0, not ttl={ttl}, margin={margin}")
        self._fs = fs
        self._bucket, self._key, _ = fs.split_path(key)
        self._what, self._ttl, self._margin = what, ttl, margin
        self._info: dict[str, Any] = {
            "holder": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ttl": ttl,
            "acquired": _utc_now(),
            "renewals": 0,
        }
        self._guard = threading.Lock()  # one S3 conversation about the lease at a time
        self._stop = threading.Event()
        self._lost: str | None = None
        self._released = False
        self._etag, self._renewed_at = self._acquire()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {key}", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`RunLocked` unless the lease is still ours; called before each commit.

        One ``HeadObject``: a commit that follows a break would mix two writers' data.
        """
        with self._guard:
            if self._released:
                raise RunLocked(f"{self._what}: the writer lease was already released")
            if self._lost is None:
                self._verify()
            if self._lost is not None:
                raise RunLocked(
                    f"{self._what}: lost the writer lease ({self._lost}); this process must stop writing the run"
                )

    def release(self) -> None:
        """Stop renewing and delete the lease, only if it is still ours (``If-Match``); idempotent."""
        self._stop.set()
        with self._guard:
            if self._released:
                return
            self._released = True
            try:
                self._fs.call_s3("delete_object", Bucket=self._bucket, Key=self._key, IfMatch=self._etag)
            except OSError as exc:
                if not _not_matched(exc):
                    raise
                logger.warning("%s: the writer lease is no longer ours; left in place", self._what)
        self._thread.join()

    def _acquire(self) -> tuple[str, float]:
        """Create the lease, breaking a stale one; our ETag and the monotonic time the write began."""
        for _ in range(_ATTEMPTS):
            started = time.monotonic()
            try:
                return self._put(IfNoneMatch="*"), started
            except OSError as exc:
                if not isinstance(exc, FileExistsError) and _code(exc) != "ConditionalRequestConflict":
                    raise
            seen = self._head()
            if seen is None:  # released or broken meanwhile: create again
                continue
            if seen.info.get("holder") == self._info["holder"]:  # our create, retried after its reply was lost
                return seen.etag, started
            if seen.server_now <= seen.expires(self._ttl, self._margin):
                raise RunLocked(
                    f"{self._what} is being written by another process "
                    f"({seen.describe(self._ttl, self._margin)}); wait for it to finish"
                )
            if self._break(seen):
                logger.warning(
                    "%s: broke the expired writer lease of %s (last renewed %s UTC)",
                    self._what,
                    seen.describe(self._ttl, self._margin),
                    f"{seen.modified:%Y-%m-%d %H:%M:%S}",
                )
        raise RunLocked(
            f"{self._what}: other processes keep taking and releasing its writer lease; wait for them to finish"
        )

    def _break(self, seen: _Seen) -> bool:
        """Delete the stale version ``seen``, unless it changed since; whether this call deleted it."""
        try:
            self._fs.call_s3("delete_object", Bucket=self._bucket, Key=self._key, IfMatch=seen.etag)
        except OSError as exc:
            if _not_matched(exc):
                return False
            raise
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            with self._guard:
                if self._stop.is_set() or self._lost is not None:
                    return
                self._renew()

    def _renew(self) -> None:
        """Rewrite the lease if it is still ours; a failure that is not a lost lease is tried again."""
        started = time.monotonic()
        self._info["renewals"] += 1
        self._info["renewed"] = _utc_now()
        try:
            self._etag, self._renewed_at = self._put(IfMatch=self._etag), started
        except OSError as exc:
            if not _not_matched(exc):
                logger.warning("%s: could not renew the writer lease, trying again: %s", self._what, exc)
                return
            seen = self._head()
            if seen is None or not self._adopt(seen):
                self._lose("another process broke it")

    def _verify(self) -> None:
        """Mark the lease lost unless we renewed it within ``ttl`` and the store still holds our version."""
        if time.monotonic() - self._renewed_at > self._ttl:
            self._lose(f"not renewed for over {self._ttl:g} s, so another process may have taken it")
            return
        seen = self._head()
        if seen is None:
            self._lose("it was broken and deleted")
        elif seen.etag != self._etag and not self._adopt(seen):
            self._lose(f"it was broken and taken by another process ({seen.describe(self._ttl, self._margin)})")

    def _adopt(self, seen: _Seen) -> bool:
        """Take ``seen`` as ours if we wrote it (a write retried after its reply was lost)."""
        if seen.info.get("holder") != self._info["holder"]:
            return False
        self._etag = seen.etag
        return True

    def _lose(self, why: str) -> None:
        self._lost = why
        logger.error("%s: lost the writer lease: %s", self._what, why)

    def _put(self, **condition: str) -> str:
        """Write our lease record under ``condition``; the new ETag."""
        record = json.dumps(self._info)
        reply = self._fs.call_s3(
            "put_object",
            Bucket=self._bucket,
            Key=self._key,
            Body=record.encode(),
            ContentType="application/json",
            Metadata={"lease": record},
            **condition,
        )
        return reply["ETag"]

    def _head(self) -> _Seen | None:
        """The lease object now, or None if there is none."""
        try:
            reply = self._fs.call_s3("head_object", Bucket=self._bucket, Key=self._key)
        except FileNotFoundError:
            return None
        try:
            info = json.loads(reply.get("Metadata", {}).get("lease", "{}"))
        except ValueError:
            info = {}
        date = reply.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        server_now = parsedate_to_datetime(date) if date else datetime.now(UTC)
        return _Seen(reply["ETag"], info if isinstance(info, dict) else {}, reply["LastModified"], server_now)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception that s3fs translated (kept as its ``__cause__``)."""
    response = getattr(exc.__cause__, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _not_matched(exc: OSError) -> bool:
    """Whether a conditional write or delete failed because the object is not the version named."""
    return isinstance(exc, FileNotFoundError) or _code(exc) == "PreconditionFailed"
