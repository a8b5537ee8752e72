"""Who is calling, and what they may read.

The auth file is TOML mapping bearer tokens to groups::

    [tokens]
    "long-random-token-1" = "vision-lab"
    "long-random-token-2" = "nlp-lab"

Callers send ``authorization: Bearer <token>``. Without an auth file the server is open: every caller
reads every run (meant for a local store on localhost, and said so in the log at start). Tokens shorter
than 16 characters, the empty one included, are refused when the file is loaded.

Whose analysis jobs a call starts, sees counted against a quota and may cancel: its group; under open
access, where there is no group, the client as far as an open server can tell it apart (``client_key``):
its host, and the bearer token it sends if any (an open server checks no token, so any string names a
caller, e.g. ``Client(address, token="alice")``). That key is declared, not proven: a client may send many
names, and clients on one host sending none are one caller. Open access trusts its callers; quotas and
fair shares that hold against a hostile caller need an auth file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from actstore.store import validate_name

MIN_TOKEN_CHARS = 16

Metadata = tuple[tuple[str, str | bytes], ...]  # a call's invocation metadata


class AuthError(Exception):
    """No or unknown token where one is required."""


@dataclass(frozen=True)
class Caller:
    group: str | None  # None: open access (no auth file)
    client: str = ""  # open access only: the caller's client key, once known (see ``identified``)

    @property
    def is_open(self) -> bool:
        return self.group is None

    @property
    def owner(self) -> str:
        """Whose jobs these are, and whose quota and fair share they count against: the group, or under
        open access the client key."""
        return f"group {self.group}" if not self.is_open else f"open caller {self.client or 'unknown'}"

    def identified(self, peer: str, metadata: Metadata | None) -> Caller:
        """This caller with its client key under open access (unchanged with a group, which already says who
        calls); ``peer`` as ``ServicerContext.peer()`` gives it, ``metadata`` the call's."""
        if not self.is_open:
            return self
        return dataclasses.replace(self, client=client_key(peer, metadata))

    def can_read(self, access: dict) -> bool:
        if self.is_open or access["visibility"] == "public":
            return True
        if access["owner_group"] == self.group:
            return True
        return access["visibility"] == "shared" and self.group in access["shared_with"]

    def owns(self, access: dict) -> bool:
        return self.is_open or access["owner_group"] == self.group


OPEN = Caller(group=None)


def client_key(peer: str, metadata: Metadata | None) -> str:
    """Who calls an open server: the peer's host (not its port: one client may open many connections, and
    a new one after a reconnect), and a digest of its bearer token when it sends one (so that callers on
    one host can be told apart, and a token never appears in a log). ``peer``: e.g. ``ipv4:127.0.0.1:5000``,
    ``ipv6:[::1]:5000``, ``unix:/path``."""
    host = peer_host(peer)
    token = bearer(metadata)
    if not token:
        return f"host {host}"
    return f"host {host} token {hashlib.sha256(token.encode()).hexdigest()[:16]}"


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string, without its port; a local socket's scheme (``unix``) for every
    caller on one (gRPC writes IPv6 brackets %-encoded: ``ipv6:%5B::1%5D:5000``)."""
    scheme, _, address = unquote(peer).partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return scheme or "unknown"
    host, _, _port = address.rpartition(":")
    return host.strip("[]") or address


def bearer(metadata: Metadata | None) -> str:
    """The token of an ``authorization: Bearer <token>`` header, stripped; "" when there is none."""
    header = dict(metadata or ()).get("authorization", "")
    scheme, _, token = str(header).partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Authenticator:
    """Maps the ``authorization`` metadata of a call to a Caller."""

    def __init__(self, tokens: dict[str, str] | None) -> None:
        self._tokens = tokens

    @classmethod
    def from_file(cls, path: Path | None) -> Authenticator:
        if path is None:
            return cls(None)
        try:
            config = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read the auth file {path}: {exc}") from None
        tokens = config.get("tokens")
        if not isinstance(tokens, dict) or not tokens:
            raise ValueError(f"auth file {path}: needs a [tokens] table mapping tokens to group names")
        for token, group in tokens.items():
            validate_name(str(group), "group name")
            if len(token.strip()) < MIN_TOKEN_CHARS:  # a short token is guessed; never print it
                raise ValueError(
                    f"auth file {path}: the token of group {group!r} has {len(token.strip())} "
                    f"characters, fewer than {MIN_TOKEN_CHARS}: use long random tokens, e.g. from "
                    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
                )
        return cls({str(token): str(group) for token, group in tokens.items()})

    @property
    def open(self) -> bool:
        return self._tokens is None

    def caller(self, metadata: Metadata | None) -> Caller:
        if self._tokens is None:
            return OPEN
        token = bearer(metadata)
        if not token:
            raise AuthError("this server needs a bearer token (authorization: Bearer <token>)")
        for known, group in self._tokens.items():  # constant-time comparison of every token
            if hmac.compare_digest(known.encode(), token.encode()):
                return Caller(group)
        raise AuthError("unknown token")
