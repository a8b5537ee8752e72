"""Keys of the analysis caches kept in a run's ``derived/`` group."""

from __future__ import annotations

import hashlib
import json


def cache_key(*parts: object) -> str:
    """A short stable key of ``parts`` (JSON-able; anything else by its text)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
