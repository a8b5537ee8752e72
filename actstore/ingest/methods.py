"""Method names: ``0shot``, ``{k}shot``, ``finetuned`` (or ``finetuned-{tag}``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from actstore.ingest.selection import SHOT_POOL_SIZE

_METHOD = re.compile(r"(?P<k>\d+)shot|finetuned(-[A-Za-z0-9._+]+)?")


@dataclass(frozen=True)
class Method:
    name: str
    k: int
    finetuned: bool


def parse_method(name: str) -> Method:
    match = _METHOD.fullmatch(name)
    if not match:
        raise ValueError(f"unknown method {name!r}: use 0shot, 1shot..{SHOT_POOL_SIZE}shot or finetuned[-TAG]")
    if match["k"] is None:
        return Method(name, 0, True)
    k = int(match["k"])
    if k > SHOT_POOL_SIZE:
        raise ValueError(f"method {name!r}: k={k} exceeds the shot pool of {SHOT_POOL_SIZE} examples per subject")
    return Method(name, k, False)
