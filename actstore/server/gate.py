"""What every actstore call passes before its handler runs: authentication, decoding, stream and byte budgets.

Authentication happens in a server interceptor, which sees the method and the metadata before gRPC has
read or decoded the request: a caller without a valid token is refused without its body ever being parsed
and without touching the store. Admitted calls decode their request here too, so that bytes which are not
a valid message get INVALID_ARGUMENT (gRPC's own decoder would answer UNKNOWN); so do health checks. Streams
are counted per caller, so that no one caller can hold more than its share of the server's streams, and
the response bytes they hold are counted server-wide. A stopping server refuses new calls here while
health keeps answering NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

from actstore.server.auth import Authenticator, AuthError, Caller
from actstore.server.errors import TooLarge

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/actstore.v1."  # health and reflection stay open, as load balancers and tools expect
DEFAULT_MAX_STREAMS_PER_CALLER = 16
MAX_STREAMS = 512  # in all: each open stream holds about a message (~1 MiB) and its transport buffers
DEFAULT_MAX_INFLIGHT_MB = 256  # response bytes all streams together hold at once (messages built, not yet sent)
DEFAULT_STREAM_IDLE_S = 30.0  # a stream whose reader takes none of its bytes for this long is ended


class Stalled(Exception):
    """DEADLINE_EXCEEDED: a stream's reader took none of its bytes for the server's idle period."""


def log_call(name: str, caller: Caller | None, code: grpc.StatusCode, started: float) -> None:
    """One line per call: method, group, status and time (never the token)."""
    who = "-" if caller is None else (caller.group or "open")
    log.info("%s group=%s status=%s %.1f ms", name, who, code.name, (time.perf_counter() - started) * 1e3)


class Drain:
    """The actstore calls in progress, and whether new ones are taken: a stopping server closes it, refuses
    new calls (UNAVAILABLE, which clients retry elsewhere or later) and waits for these to finish, while
    gRPC itself still answers health checks (NOT_SERVING) on the open port."""

    def __init__(self) -> None:
        self.closed = False
        self._calls = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        self._calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._calls -= 1
            if not self._calls:
                self._idle.set()

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the calls in progress to end; True when they all did."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class AuthGate(grpc.aio.ServerInterceptor):
    """Resolves the caller of every actstore method from its metadata and hands it to the handler as
    ``caller``; refuses a missing or unknown token with UNAUTHENTICATED before the request is read, and
    every actstore call with UNAVAILABLE once the server is draining."""

    def __init__(self, auth: Authenticator, drain: Drain) -> None:
        self.auth = auth
        self.drain = drain

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        name = details.method.rsplit("/", 1)[-1]
        if not details.method.startswith(PROTECTED_PREFIX):
            return _decoding(name, handler)
        if self.drain.closed:
            return _handler_like(
                handler,
                _refusal(
                    name,
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down: retry after its restart or on another replica",
                ),
            )
        try:
            caller = self.auth.caller(details.invocation_metadata)
        except AuthError as exc:
            return _handler_like(handler, _refusal(name, grpc.StatusCode.UNAUTHENTICATED, str(exc)))
        return _handler_like(handler, _admitted(name, handler, caller, self.drain))


def _handler_like(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary or server-streaming) whose request arrives undecoded, and whose
    responses may come serialized already (bytes: ReadStates serializes off the event loop)."""
    kind = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return kind(behavior, request_deserializer=None, response_serializer=_passing_bytes(handler.response_serializer))


def _passing_bytes(serialize: Callable[[object], bytes] | None) -> Callable[[object], bytes] | None:
    if serialize is None:
        return None
    return lambda response: response if isinstance(response, bytes) else serialize(response)


def _refusal(name: str, code: grpc.StatusCode, message: str) -> Callable:
    async def refuse(_raw: bytes, context: grpc.aio.ServicerContext) -> None:
        log_call(name, None, code, time.perf_counter())
        await context.abort(code, message)

    return refuse


async def _decode(
    name: str, decode: Callable[[bytes], object], raw: bytes, context: grpc.aio.ServicerContext, caller: Caller | None
) -> object:
    """The request, or INVALID_ARGUMENT for bytes that are no such message."""
    try:
        return decode(raw)
    except DecodeError:
        log_call(name, caller, grpc.StatusCode.INVALID_ARGUMENT, time.perf_counter())
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {name} request message")


def _admitted(name: str, handler: grpc.RpcMethodHandler, caller: Caller, drain: Drain) -> Callable:
    behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary

    async def call(raw: bytes, context: grpc.aio.ServicerContext):
        with drain.call():
            request = await _decode(name, handler.request_deserializer, raw, context, caller)
            return await behavior(request, context, caller)

    return call


def _decoding(name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """An open method (health) decoding its own request: garbage gets INVALID_ARGUMENT, not gRPC's UNKNOWN.
    Streamed requests (reflection) are left to gRPC."""
    if handler.request_streaming or handler.request_deserializer is None:
        return handler
    behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary

    async def call(raw: bytes, context: grpc.aio.ServicerContext):
        return await behavior(await _decode(name, handler.request_deserializer, raw, context, None), context)

    return _handler_like(handler, call)


def caller_key(caller: Caller, peer: str) -> str:
    """Whose budget a stream counts against: the group; under open access, which trusts every caller
    anyway, the client connection (one ``Client``), so that local users do not share one budget."""
    return f"group {caller.group}" if not caller.is_open else f"connection {peer}"


class StreamBudget:
    """What streams may hold, counted on the event loop's thread only: concurrent streams per caller (at
    most ``limit`` each) and in all (MAX_STREAMS); response bytes in flight in all (``max_bytes``: each
    stream reserves the message it is about to build and gives it back once gRPC has taken it, which it
    does only as the peer's flow-control window opens); and ``idle_s``, how long a write may wait for a
    reader that takes nothing before the stream is ended."""

    def __init__(
        self, limit: int, max_bytes: int = DEFAULT_MAX_INFLIGHT_MB << 20, idle_s: float = DEFAULT_STREAM_IDLE_S
    ) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self._open: Counter[str] = Counter()
        self._bytes = 0
        self._waiting = 0  # reservations waiting for room, to be woken when some is given back
        self._freed = asyncio.Condition()

    @property
    def bytes_in_flight(self) -> int:
        return self._bytes

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """One stream of ``key`` for the duration; TooLarge (RESOURCE_EXHAUSTED) past either limit."""
        if self._open[key] >= self.limit:
            raise TooLarge(
                f"{key} already has {self.limit} streams open on this server, its limit: finish, "
                "cancel or read faster those streams before opening another"
            )
        if self._open.total() >= MAX_STREAMS:
            raise TooLarge(f"this server has {MAX_STREAMS} streams open, its limit: retry later")
        self._open[key] += 1
        try:
            yield
        finally:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """``nbytes`` of the server's response bytes for the duration, waiting up to ``idle_s`` for room;
        TooLarge (RESOURCE_EXHAUSTED) after that. One reservation larger than the whole budget is let
        through alone, so that no answer the response cap allows is refused forever. Taking room that is
        free costs no await (the common case, on every message)."""
        if self._fits(nbytes):
            self._bytes += nbytes
        else:
            await self._wait_for_room(nbytes)
        try:
            yield
        finally:
            self._bytes -= nbytes
            if self._waiting:
                async with self._freed:
                    self._freed.notify_all()

    async def _wait_for_room(self, nbytes: int) -> None:
        """Take ``nbytes`` once they fit, or TooLarge after ``idle_s``; taken under the lock, without an await
        between the check and the taking, so that two waiters woken together cannot both take the room."""
        self._waiting += 1
        try:
            async with asyncio.timeout(self.idle_s), self._freed:
                await self._freed.wait_for(lambda: self._fits(nbytes))
                self._bytes += nbytes
        except TimeoutError:
            raise TooLarge(
                f"this server holds {self._bytes / 2**20:.3g} MiB of responses its readers have not "
                f"taken yet, its limit of {self.max_bytes / 2**20:.3g} MiB: retry later"
            ) from None
        finally:
            self._waiting -= 1

    def _fits(self, nbytes: int) -> bool:
        return self._bytes + nbytes <= self.max_bytes or self._bytes == 0
