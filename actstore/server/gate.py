"""What every actstore call passes before its handler runs: authentication, decoding, a stream budget.

Authentication happens in a server interceptor, which sees the method and the metadata before gRPC has
read or decoded the request: a caller without a valid token is refused without its body ever being parsed
and without touching the store. Admitted calls decode their request here too, so that bytes which are not
a valid message get INVALID_ARGUMENT (gRPC's own decoder would answer UNKNOWN). Streams are counted per
caller, so that no one caller can hold more than its share of the server's streams.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

from actstore.server.auth import AuthError, Authenticator, Caller
from actstore.server.errors import TooLarge

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/actstore.v1."  # health and reflection stay open, as load balancers and tools expect
DEFAULT_MAX_STREAMS_PER_CALLER = 16
MAX_STREAMS = 512  # in all: each open stream holds about a message (~1 MiB) and its transport buffers


def log_call(name: str, caller: Caller | None, code: grpc.StatusCode, started: float) -> None:
    """One line per call: method, group, status and time (never the token)."""
    who = "-" if caller is None else (caller.group or "open")
    log.info("%s group=%s status=%s %.1f ms", name, who, code.name, (time.perf_counter() - started) * 1e3)


class AuthGate(grpc.aio.ServerInterceptor):
    """Resolves the caller of every actstore method from its metadata and hands it to the handler as
    ``caller``; refuses a missing or unknown token with UNAUTHENTICATED before the request is read."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        name = details.method.rsplit("/", 1)[-1]
        try:
            caller = self.auth.caller(details.invocation_metadata)
        except AuthError as exc:
            return _handler_like(handler, _refusal(name, str(exc)))
        return _handler_like(handler, _admitted(name, handler, caller))


def _handler_like(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary or server-streaming) whose request arrives undecoded."""
    kind = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return kind(behavior, request_deserializer=None, response_serializer=handler.response_serializer)


def _refusal(name: str, message: str) -> Callable:
    async def refuse(_raw: bytes, context: grpc.aio.ServicerContext) -> None:
        log_call(name, None, grpc.StatusCode.UNAUTHENTICATED, time.perf_counter())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return refuse


def _admitted(name: str, handler: grpc.RpcMethodHandler, caller: Caller) -> Callable:
    behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
    decode = handler.request_deserializer

    async def call(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = decode(raw)
        except DecodeError:
            log_call(name, caller, grpc.StatusCode.INVALID_ARGUMENT, time.perf_counter())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {name} request message")
        return await behavior(request, context, caller)

    return call


def caller_key(caller: Caller, peer: str) -> str:
    """Whose budget a stream counts against: the group; under open access, which trusts every caller
    anyway, the client connection (one ``Client``), so that local users do not share one budget."""
    return f"group {caller.group}" if not caller.is_open else f"connection {peer}"


class StreamBudget:
    """Concurrent streams per caller (at most ``limit`` each) and in all (MAX_STREAMS), counted on the
    event loop's thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """One stream of ``key`` for the duration; TooLarge (RESOURCE_EXHAUSTED) past either limit."""
        if self._open[key] >= self.limit:
            raise TooLarge(f"{key} already has {self.limit} streams open on this server, its limit: finish, "
                           "cancel or read faster those streams before opening another")
        if self._open.total() >= MAX_STREAMS:
            raise TooLarge(f"this server has {MAX_STREAMS} streams open, its limit: retry later")
        self._open[key] += 1
        try:
            yield
        finally:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]
