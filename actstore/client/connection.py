"""A connection to an actstore server: the channel, the caller's token, deadlines and retries of every call.

``Client`` (the runs, states and analyses) and ``AnalysisJob`` (one job) make their calls through it, so that
every call has the same deadline and rides over a server restart the same way.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc

from actstore.client.channel import open_channel
from actstore.client.errors import ActstoreError
from actstore.protocol import DEFAULT_ADDRESS
from actstore.v1 import actstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0  # deadline of each unary call: a stalled server must not hang its callers
DEFAULT_STREAM_TIMEOUT_S = 600.0  # deadline of a whole ReadStates stream (the server caps its size)
DEFAULT_RETRY_FOR_S = 10.0  # how long UNAVAILABLE is retried: enough to ride over a quick server restart
RETRY_ENV = "ACTSTORE_RETRY_FOR"  # the shell's way to set retry_for (actstore query, analyze)
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 2.0


class Connection:
    """The channel to a server (or its replicas) with the caller's token, deadlines and retry policy, and
    the stubs of its services."""

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        token: str | None = None,
        tls: bool | str | Path = False,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT_S,
        retry_for: float = DEFAULT_RETRY_FOR_S,
        retries: int | None = None,
    ) -> None:
        """``address``: HOST[:PORT], port 50051 unless given; or several replicas serving the same store, as a
        list or one comma-separated string (``"h1:50051,h2:50051"``), whose calls gRPC spreads round-robin
        (see ``channel.channel_target``). ``tls``: True for the system's CA roots, or the path of a PEM CA
        bundle (e.g. a self-signed cert).

        ``timeout``: deadline in seconds of each call but ``hidden_states``, whose whole stream has
        ``stream_timeout`` (None: no deadline; keepalive pings still end a call to a stalled server within
        ~30 s, as they do ``AnalysisJob.watch``). UNAVAILABLE (server down or restarting, a run briefly
        locked) is retried for ``retry_for`` seconds (longer to ride over a slow restart), at most ``retries``
        times when given, with exponential backoff and jitter.
        """
        if not retry_for >= 0:
            raise ValueError(f"retry_for must be 0 or more seconds, not {retry_for}")
        self._channel = open_channel(address, tls)
        self.address = ",".join(address) if not isinstance(address, str) else address  # as shown, never the token
        self._shown = (bool(token), bool(tls))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout, self.stream_timeout = timeout, stream_timeout
        self._retry_for, self._retries = retry_for, retries
        self.catalog_stub = pb_grpc.CatalogServiceStub(self._channel)
        self.data_stub = pb_grpc.DataServiceStub(self._channel)
        self.analysis_stub = pb_grpc.AnalysisServiceStub(self._channel)

    def __repr__(self) -> str:
        token, tls = self._shown
        return (
            f"<{type(self).__name__} {self.address} ({'with' if token else 'no'} token, "
            f"{'TLS' if tls else 'plaintext'})>"
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, method: Callable[..., T], request: Any) -> T:
        """A unary call with the caller's token and the deadline, retried while UNAVAILABLE."""
        return self.retry(lambda: method(request, metadata=self._metadata, timeout=self._timeout))

    def stream(self, method: Callable[..., Iterator[T]], request: Any, timeout: float | None) -> Iterator[T]:
        """A server-streaming call with the caller's token and ``timeout`` for the whole stream; not retried
        here (a caller that can restart the stream from scratch wraps its reading in ``retry``)."""
        return method(request, metadata=self._metadata, timeout=timeout)

    def retry(self, attempt: Callable[[], T]) -> T:
        """Retry UNAVAILABLE for ``retry_for`` seconds: backoff doubling from 0.1 s to 2 s, each delay drawn
        from its upper half so that clients who lost the same server do not come back in step.

        Not gRPC's retryPolicy service config: it allows at most 5 attempts with delays drawn from zero up,
        so its total wait is too short and too random to span a server restart; and it would not cover
        a stream that fails after its first message.
        """
        started, retried = time.monotonic(), 0
        while True:
            try:
                return attempt()
            except grpc.RpcError as exc:
                code = exc.code()
                delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2**retried) * random.uniform(0.5, 1.0)
                capped = self._retries is not None and retried >= self._retries
                if code is not grpc.StatusCode.UNAVAILABLE or capped:
                    raise ActstoreError(code, exc.details() or "") from None
                if time.monotonic() + delay > started + self._retry_for:
                    raise ActstoreError(code, _gave_up(exc.details() or "", self._retry_for)) from None
                log.info("server unavailable (%s); retrying in %.1f s", exc.details(), delay)
                time.sleep(delay)
                retried += 1


def _gave_up(details: str, window: float) -> str:
    """UNAVAILABLE once the retry window is spent: what happened, and how to wait longer."""
    return (
        f"{details} (still unavailable after retrying for {window:g} s: the server is down, restarting or "
        f"unreachable; to wait longer pass Client(retry_for=SECONDS), or `actstore query --retry-for SECONDS` "
        f"or ${RETRY_ENV})"
    )
