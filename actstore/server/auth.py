"""Who is calling, and what they may read.

The auth file is TOML mapping bearer tokens to groups::

    [tokens]
    "long-random-token-1" = "vision-lab"
    "long-random-token-2" = "nlp-lab"

Callers send ``authorization: Bearer <token>``. Without an auth file the server is open: every caller
reads every run (meant for a local store on localhost, and said so in the log at start). Tokens shorter
than 16 characters, the empty one included, are refused when the file is loaded.
"""

from __future__ import annotations

import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path

from actstore.store import validate_name


MIN_TOKEN_CHARS = 16


class AuthError(Exception):
    """No or unknown token where one is required."""


@dataclass(frozen=True)
class Caller:
    group: str | None  # None: open access (no auth file)

    @property
    def is_open(self) -> bool:
        return self.group is None

    def can_read(self, access: dict) -> bool:
        if self.is_open or access["visibility"] == "public":
            return True
        if access["owner_group"] == self.group:
            return True
        return access["visibility"] == "shared" and self.group in access["shared_with"]

    def owns(self, access: dict) -> bool:
        return self.is_open or access["owner_group"] == self.group


OPEN = Caller(group=None)


class Authenticator:
    """Maps the ``authorization`` metadata of a call to a Caller."""

    def __init__(self, tokens: dict[str, str] | None) -> None:
        self._tokens = tokens

    @classmethod
    def from_file(cls, path: Path | None) -> "Authenticator":
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
                raise ValueError(f"auth file {path}: the token of group {group!r} has {len(token.strip())} "
                                 f"characters, fewer than {MIN_TOKEN_CHARS}: use long random tokens, e.g. from "
                                 "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return cls({str(token): str(group) for token, group in tokens.items()})

    @property
    def open(self) -> bool:
        return self._tokens is None

    def caller(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Caller:
        if self._tokens is None:
            return OPEN
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("this server needs a bearer token (authorization: Bearer <token>)")
        for known, group in self._tokens.items():  # constant-time comparison of every token
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                return Caller(group)
        raise AuthError("unknown token")
