"""``HOST[:PORT]`` addresses, checked before gRPC sees them: the server binds them, the client dials them.

gRPC reads a missing port as 443 and port 99999 as 99999 mod 65536, and says only "Failed to bind" for a
bad host; here a missing port means actstore's 50051 and anything malformed is refused with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_PORT = 50051
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def parse_address(text: str) -> str:
    """``text`` as ``HOST:PORT`` (port 50051 when none is given); gRPC targets with a scheme pass unchanged.

    Raises ValueError for an empty or malformed host and a port outside 0..65535.
    """
    text = text.strip()
    if "://" in text or text.startswith("unix:"):
        return text
    host, port, bracketed = text, str(DEFAULT_PORT), text.startswith("[")
    if (bracketed and "]:" in text) or (not bracketed and text.count(":") == 1):
        host, port = text.rsplit(":", 1)
    elif not bracketed and ":" in text:  # a bare IPv6 address
        host = f"[{text}]"
    if not _HOST.fullmatch(host):
        raise ValueError(f"invalid address {text[:64]!r}: expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid port in {text[:64]!r}: expected a number in 0..65535")
    return f"{host}:{int(port)}"


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """Several ``HOST[:PORT]`` addresses, given as a list or as one comma-separated string (``h1:1,h2:2``),
    each checked by ``parse_address``. A gRPC target with a scheme stays one target: it may hold commas of
    its own (``ipv4:a:1,b:2``) and cannot be combined with other addresses.
    """
    parts = [addresses] if isinstance(addresses, str) else list(addresses)
    if len(parts) == 1 and _has_scheme(parts[0]):
        return [parts[0].strip()]
    found = [part for text in parts for part in text.split(",") if part.strip()]
    if not found:
        raise ValueError("no address given: expected HOST[:PORT], or several separated by commas")
    if len(found) > 1 and any(_has_scheme(part) for part in found):
        raise ValueError(
            "a gRPC target with a scheme (dns:, unix:, ipv4:...) cannot be one of several "
            "addresses: give several HOST[:PORT] instead"
        )
    return [parse_address(part) for part in found]


def _has_scheme(text: str) -> bool:
    return "://" in text or text.strip().startswith(("unix:", "dns:", "ipv4:", "ipv6:"))
