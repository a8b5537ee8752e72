"""The one exception the client raises for a call that did not succeed, whatever went wrong on the way."""

from __future__ import annotations

import grpc


class ActstoreError(Exception):
    """A call the server refused or failed: ``code`` is the gRPC status, the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
