"""Building and running the gRPC server: services, health, reflection, TLS, graceful shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from actstore.address import parse_address
from actstore.pools import cores
from actstore.protocol import DEFAULT_ADDRESS, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES
from actstore.server.auth import Authenticator
from actstore.server.catalog_service import CatalogService
from actstore.server.data_service import DataService
from actstore.server.gate import (
    DEFAULT_MAX_INFLIGHT_MB,
    DEFAULT_MAX_STREAMS_PER_CALLER,
    DEFAULT_STREAM_IDLE_S,
    AuthGate,
    Drain,
    StreamBudget,
)
from actstore.store import Store
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    pb.DESCRIPTOR.services_by_name[name].full_name for name in ("CatalogService", "DataService", "AnalysisService")
]
DEFAULT_MAX_RESPONSE_MB = 4096
DEFAULT_WORKERS = min(32, 2 * cores() + 4)
SHUTDOWN_GRACE_S = 30.0
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Requests are small (a selection); a larger one is refused by gRPC before it is decoded.
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    # gRPC binds with SO_REUSEPORT by default: a second server on a busy port would start and share it silently.
    ("grpc.so_reuseport", 0),
    # actstore's client pings every 20 s on an idle call to notice a stalled server; gRPC servers otherwise
    # take pings more often than every 5 minutes as abuse and drop the connection (a long WatchJob).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


@dataclass
class ServerConfig:
    store: str | Path  # a folder or s3://bucket/prefix
    address: str = DEFAULT_ADDRESS
    auth_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_response_mb: float = DEFAULT_MAX_RESPONSE_MB
    workers: int = DEFAULT_WORKERS  # threads for blocking store and numpy work; streams and waits hold none
    max_streams_per_caller: int = DEFAULT_MAX_STREAMS_PER_CALLER
    max_inflight_mb: float = DEFAULT_MAX_INFLIGHT_MB  # response bytes all streams hold at once, unsent
    stream_idle_s: float = DEFAULT_STREAM_IDLE_S  # a stream whose client reads nothing this long is ended
    scheduler: str | None = None  # Dask scheduler address for analyses; None: a local cluster on first use
    dask_workers: int | None = None  # local cluster size (default: one per core)


class Server:
    """A running actstore server on grpc's asyncio server; ``port`` is the bound port (useful with an
    address ending in :0). Build it inside a running event loop (see ``serve``)."""

    def __init__(self, config: ServerConfig) -> None:
        store = Store(config.store)
        if not store.exists():
            raise ValueError(f"no actstore store at {config.store} (run `actstore ingest --store {config.store}`)")
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if config.workers < 1 or config.max_streams_per_caller < 1:
            raise ValueError("--workers and --max-streams-per-caller must be at least 1")
        if not config.max_inflight_mb > 0 or not config.stream_idle_s > 0:
            raise ValueError("--max-inflight-mb and --stream-idle-timeout must be above 0")
        self.config = replace(config, address=parse_address(config.address))
        self.auth = Authenticator.from_file(config.auth_file)
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="actstore-rpc")
        self.drain = Drain()
        self.grpc = grpc.aio.server(interceptors=[AuthGate(self.auth, self.drain)], options=SERVER_OPTIONS)
        streams = StreamBudget(config.max_streams_per_caller, int(config.max_inflight_mb * 2**20), config.stream_idle_s)
        common = (store, int(config.max_response_mb * 2**20), self.pool, streams)
        pb_grpc.add_CatalogServiceServicer_to_server(CatalogService(*common), self.grpc)
        pb_grpc.add_DataServiceServicer_to_server(DataService(*common), self.grpc)
        self.jobs = self._analysis(common)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.grpc,
        )
        self.port = self._bind()

    def _analysis(self, common: tuple):
        """AnalysisService, when the analysis extra (dask, dadapy) is installed."""
        try:
            from actstore.server.analysis_service import AnalysisService
            from actstore.server.jobs import JobManager
        except ImportError as exc:
            log.warning("analyses disabled: %s (install actstore[analysis])", exc)
            return None
        store = common[0]  # its URL, which each Dask worker opens itself: tasks carry it and run names, never arrays
        jobs = JobManager(store.url, self.config.scheduler, self.config.dask_workers)
        pb_grpc.add_AnalysisServiceServicer_to_server(AnalysisService(*common, jobs=jobs), self.grpc)
        return jobs

    def _bind(self) -> int:
        """Bind the address, or raise ValueError with the likely reasons: gRPC says only "Failed to bind"."""
        address, tls = self.config.address, self.config.tls_cert
        try:
            if tls:
                key_and_chain = (_read_pem(self.config.tls_key), _read_pem(tls))
                return self.grpc.add_secure_port(address, grpc.ssl_server_credentials([key_and_chain]))
            return self.grpc.add_insecure_port(address)
        except RuntimeError:
            raise ValueError(
                f"cannot listen on {address}: the port is in use, or the host is not an address of "
                "this machine"
                + (", or --tls-cert/--tls-key are not a PEM certificate chain and its private key" if tls else "")
            ) from None

    async def start(self) -> None:
        await self.grpc.start()
        for name in ["", *SERVICE_NAMES]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = self.config.address.rsplit(":", 1)[0]
        log.info(
            "actstore serving %s on %s:%d%s (%d worker threads, %d streams per caller, %g MiB of responses "
            "in flight, streams idle for %g s ended)",
            self.config.store,
            host,
            self.port,
            " with TLS" if self.config.tls_cert else "",
            self.config.workers,
            self.config.max_streams_per_caller,
            self.config.max_inflight_mb,
            self.config.stream_idle_s,
        )
        if self.auth.open:
            exposed = "" if _is_loopback(host) else " -- WARNING: this address is reachable from other machines"
            log.warning(
                "open access: no auth file, every caller reads every run; the stream limit counts per "
                "client connection%s",
                exposed,
            )

    async def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Flip health to NOT_SERVING, refuse new calls, let in-flight calls finish within ``grace``.

        Draining happens before gRPC's own stop, which would refuse every new call at once, health checks
        included (UNAVAILABLE): meanwhile a probe still reaches the server and reads NOT_SERVING.
        """
        log.info("shutting down: health NOT_SERVING, finishing in-flight calls (up to %.0f s)", grace)
        started = asyncio.get_running_loop().time()
        await self.health.enter_graceful_shutdown()
        self.drain.closed = True
        if not await self.drain.wait(grace):
            log.warning("calls still in flight after %.0f s: cancelling them", grace)
        await self.grpc.stop(max(0.0, grace - (asyncio.get_running_loop().time() - started)))
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.jobs is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.jobs.close)
        log.info("stopped")


def _read_pem(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS file {path}: {exc.strerror or exc}") from None


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    asyncio.run(_serve(config))


async def _serve(config: ServerConfig) -> None:
    """The event loop's signal handlers wake it through its self-pipe, written by Python's C-level handler
    whichever thread the kernel picked (after SIGSTOP and SIGCONT it may be one of gRPC's)."""
    server = Server(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    await stopping.wait()
    await server.stop()
