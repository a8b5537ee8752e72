"""The gRPC channel to one server or to several replicas: its target, name resolution and options."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from pathlib import Path

import grpc

from actstore.address import parse_addresses
from actstore.protocol import CHANNEL_OPTIONS

CLIENT_OPTIONS = [
    *CHANNEL_OPTIONS,
    # Reconnect at least every second once the server is gone (gRPC's default backoff grows to minutes),
    # so that a retry finds a restarted server within the retry window.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Ping a silent server every 20 s, however long the call has been idle, and drop the connection if it
    # does not answer within 10 s, so that a call without a deadline (WatchJob, or timeout=None) cannot
    # hang on a stalled server; gRPC's own pings would otherwise wait 60 s for their answer and hold the
    # keepalive back meanwhile. actstore's server accepts pings this often (app.SERVER_OPTIONS).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def open_channel(address: str | Sequence[str], tls: bool | str | Path = False) -> grpc.Channel:
    """A channel to ``address`` (see ``channel_target``); ``tls``: True for the system's CA roots, or the
    path of a PEM CA bundle (e.g. a self-signed cert)."""
    target, options = channel_target(address)
    options = [*CLIENT_OPTIONS, *options]
    if tls:
        roots = None if tls is True else Path(tls).read_bytes()
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
    return grpc.insecure_channel(target, options=options)


def channel_target(address: str | Sequence[str]) -> tuple[str, list[tuple[str, str]]]:
    """The gRPC target of one address or of several replicas, and the channel options it needs.

    One address is dialled as given (gRPC's default ``pick_first``), exactly as before replicas existed.
    Several become one channel over gRPC's static resolver, ``ipv4:IP:PORT,IP:PORT`` (or ``ipv6:``), with
    the ``round_robin`` policy: gRPC keeps a connection to each replica, sends each call to the next ready
    one and skips a replica whose connection is lost, so ``Connection.retry`` lands a retried call elsewhere.
    gRPC offers no target that lists several host *names* (``dns:`` resolves one name, and ``ipv4:``/``ipv6:``
    take literals only), so names are resolved here, once, with ``getaddrinfo``: a replica that moves to
    another IP needs a new Client. One address family serves all replicas (IPv4 when every name has one).

    The channel's authority, which TLS checks the certificates against, is the first address's host (gRPC
    would otherwise take the comma-separated list): every replica's certificate must name that host, e.g.
    one certificate for the service's name shared by the replicas, or one that lists every replica's name.
    """
    addresses = parse_addresses(address)
    if len(addresses) == 1:
        return addresses[0], []
    hosts_ports = [a.rsplit(":", 1) for a in addresses]
    family, literals = _one_family([_resolve(host.strip("[]"), int(port)) for host, port in hosts_ports])
    scheme, shown = ("ipv4", "{}:{}") if family == socket.AF_INET else ("ipv6", "[{}]:{}")
    target = f"{scheme}:" + ",".join(shown.format(ip, port) for ip, (_, port) in zip(literals, hosts_ports))
    authority = hosts_ports[0][0].strip("[]")
    return target, [
        ("grpc.service_config", ROUND_ROBIN),
        ("grpc.default_authority", authority),
        ("grpc.ssl_target_name_override", authority),
    ]


def _resolve(host: str, port: int) -> dict[int, str]:
    """The first IPv4 and the first IPv6 address of ``host``, by family."""
    try:
        found = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve the server address {host}: {exc.strerror}") from None
    by_family: dict[int, str] = {}
    for family, *_, sockaddr in found:
        if family in (socket.AF_INET, socket.AF_INET6):
            by_family.setdefault(family, sockaddr[0])
    return by_family


def _one_family(resolved: list[dict[int, str]]) -> tuple[int, list[str]]:
    """One address family that every replica has (a gRPC target holds one), and each replica's IP in it."""
    for family in (socket.AF_INET, socket.AF_INET6):
        if all(family in r for r in resolved):
            return family, [r[family] for r in resolved]
    raise ValueError(
        "the server addresses mix IPv4 and IPv6: gRPC balances over one family; give names or IPs of one family"
    )
