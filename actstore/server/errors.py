"""The server's error vocabulary: each exception a handler raises on purpose, and the gRPC status it becomes.

Handlers and the job manager raise these; only the service's ``rpc`` wrapper turns them into statuses, so
every call answers the same condition with the same code.
"""

from __future__ import annotations

import grpc

from actstore.server.auth import AuthError
from actstore.server.selection import BadRequest, NotFound
from actstore.store import CorruptData, InvalidName, RunLocked, RunNotFound
from actstore.store.errors import NameNotHeld, RefusedEntry


class Forbidden(Exception):
    """PERMISSION_DENIED."""


class TooLarge(Exception):
    """RESOURCE_EXHAUSTED: a request, response or caller past one of the server's limits."""


class Lossy(Exception):
    """FAILED_PRECONDITION: float16 would change values the caller did not agree to lose."""


class TooSmall(Exception):
    """FAILED_PRECONDITION: a run holds too few samples for any analysis; it will not do until it grows."""


class Unavailable(Exception):
    """UNAVAILABLE: a part the call needs (the Dask scheduler, a locked run) cannot serve it now; retry later."""


_STATUS = [
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    # NameNotHeld (a site or label the run lacks) is a KeyError, but a bad argument like an unknown label value:
    # INVALID_ARGUMENT whether a handler's check or a Dask worker's read finds it
    ((InvalidName, BadRequest, NameNotHeld), grpc.StatusCode.INVALID_ARGUMENT),
    ((RunNotFound, NotFound, LookupError), grpc.StatusCode.NOT_FOUND),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((Lossy, RefusedEntry, TooSmall), grpc.StatusCode.FAILED_PRECONDITION),  # RefusedEntry: a file not opened
    (CorruptData, grpc.StatusCode.DATA_LOSS),  # DamagedRun among them: a run whose metadata cannot be read
    ((RunLocked, Unavailable), grpc.StatusCode.UNAVAILABLE),
]


def status_of(exc: Exception) -> grpc.StatusCode:
    """The status for ``exc``; INTERNAL for anything not raised on purpose."""
    for kinds, code in _STATUS:
        if isinstance(exc, kinds):
            return code
    return grpc.StatusCode.INTERNAL
