"""What every gRPC handler of the server shares: the ``rpc`` wrapper (errors to statuses, a log line per
call, blocking work off the event loop) and the base of the servicers (the store, and run access)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

import grpc

from actstore.server.auth import Caller
from actstore.server.errors import status_of
from actstore.server.gate import Stalled, StreamBudget, caller_key, log_call
from actstore.store import Run, RunNotFound, Store
from actstore.store.errors import DamagedRun
from actstore.v1 import actstore_pb2 as pb

log = logging.getLogger(__name__)

MAX_DETAILS_CHARS = 1000  # status details travel in HTTP/2 trailers, which peers cap at a few KiB


def rpc(method: Callable) -> Callable:
    """Map errors to precise statuses and log each call; the caller comes from the AuthGate interceptor.

    A plain function is blocking work (the store, numpy): it runs on the server's bounded executor, so the
    event loop stays free for every other call. A coroutine is a stream: it runs on the event loop and
    awaits each write, so a client that stops reading holds no thread; it counts against its caller's
    stream budget while it runs.
    """
    name = method.__name__
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def streaming(self, request, context: grpc.aio.ServicerContext, caller: Caller) -> None:
            started = time.perf_counter()
            try:
                with self.streams.hold(caller_key(caller, context.peer())):
                    await method(self, request, context, caller)
            except asyncio.CancelledError:
                log_call(name, caller, grpc.StatusCode.CANCELLED, started)
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                await _fail(context, name, started, caller, exc)
            log_call(name, caller, grpc.StatusCode.OK, started)

        return streaming

    @functools.wraps(method)
    async def unary(self, request, context: grpc.aio.ServicerContext, caller: Caller):
        started = time.perf_counter()
        try:
            response = await self.offload(method, self, request, caller)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await _fail(context, name, started, caller, exc)
        log_call(name, caller, grpc.StatusCode.OK, started)
        return response

    return unary


async def _fail(context: grpc.aio.ServicerContext, name: str, started: float, caller: Caller, exc: Exception) -> None:
    code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(exc, Stalled) else status_of(exc)
    log_call(name, caller, code, started)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error in %s", name, exc_info=exc)
    details = str(exc) if code is not grpc.StatusCode.INTERNAL else "internal server error"
    await context.abort(code, details if len(details) <= MAX_DETAILS_CHARS else details[:MAX_DETAILS_CHARS] + "...")


class Servicer:
    """The base of the services: the store, the response cap, the executor for blocking work and the
    stream budget, and the one way a handler opens a run on a caller's behalf."""

    def __init__(self, store: Store, max_response_bytes: int, pool: Executor, streams: StreamBudget) -> None:
        self.store = store
        self.max_response_bytes = max_response_bytes
        self.pool = pool
        self.streams = streams

    async def offload(self, fn: Callable, *args):
        """``fn(*args)`` on the bounded executor: blocking work never stalls the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def readable_run(self, ref: pb.RunRef, caller: Caller) -> Run:
        """The run, or NOT_FOUND worded alike whether it is absent or hidden from this caller (AIP-211):
        a different answer would tell outsiders which private runs exist."""
        absent = RunNotFound(f"no run {ref.model}/{ref.method}")  # not the store's message: it lists every run
        try:
            run = self.store.run(ref.model, ref.method)
        except RunNotFound:
            raise absent from None
        except DamagedRun as damaged:  # DATA_LOSS only to callers who could read it; unknown access: open servers
            if not (caller.can_read(damaged.access) if damaged.access is not None else caller.is_open):
                raise absent from None
            raise
        if not caller.can_read(run.access):
            raise absent
        return run
