"""``actstore serve``: put a store on the network over gRPC."""

from __future__ import annotations

import argparse
from pathlib import Path

from actstore.arguments import add_store_argument
from actstore.protocol import DEFAULT_ADDRESS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a store over gRPC", description=__doc__.split(": ", 1)[1])
    add_store_argument(p)
    p.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help="HOST[:PORT] to listen on (default: %(default)s; no port: 50051; port 0 picks a free one)",
    )
    p.add_argument("--auth", type=Path, help="TOML file mapping bearer tokens to groups (default: open access)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key: serve over TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument(
        "--max-response-mb",
        type=float,
        default=4096,
        help="largest answer one request may ask for, in MiB (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="threads for blocking reads and numpy work (default: 2 x cores + 4, at most 32); "
        "open streams and job watchers hold none",
    )
    p.add_argument(
        "--max-streams-per-caller",
        type=int,
        default=None,
        help="concurrent ReadStates/WatchJob streams per group (open access: per client connection); "
        "more get RESOURCE_EXHAUSTED (default: 16)",
    )
    p.add_argument(
        "--max-inflight-mb",
        type=float,
        default=None,
        help="response bytes all streams together hold before their clients take them, in MiB; new "
        "messages wait for room, and after --stream-idle-timeout get RESOURCE_EXHAUSTED "
        "(default: 256)",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="end a stream (DEADLINE_EXCEEDED) whose client reads none of it for this long (default: 30)",
    )
    p.add_argument("--scheduler", help="Dask scheduler address for analyses (default: a local cluster on first use)")
    p.add_argument("--dask-workers", type=int, help="local Dask worker processes (default: one per core)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from actstore.server.app import ServerConfig, serve

    limits = {
        name: value
        for name, value in [
            ("workers", args.workers),
            ("max_streams_per_caller", args.max_streams_per_caller),
            ("max_inflight_mb", args.max_inflight_mb),
            ("stream_idle_s", args.stream_idle_timeout),
        ]
        if value is not None
    }
    serve(
        ServerConfig(
            store=args.store,
            address=args.address,
            auth_file=args.auth,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            max_response_mb=args.max_response_mb,
            scheduler=args.scheduler,
            dask_workers=args.dask_workers,
            **limits,
        )
    )
    return 0
