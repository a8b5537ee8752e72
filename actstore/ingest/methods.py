"""Method names: ``0shot``, ``{k}shot``, ``finetuned``, ``finetuned-stepN`` (or ``finetuned-{tag}``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from actstore.ingest.selection import SHOT_POOL_SIZE

_METHOD = re.compile(r"(?P<k>\d+)shot|finetuned(-step(?P<step>\d+)|-[A-Za-z0-9._+]+)?")


@dataclass(frozen=True)
class Method:
    name: str
    k: int
    finetuned: bool
    step: int | None = None  # finetuned-stepN: the checkpoint saved after N training steps

    def checkpoint_folder(self, checkpoint: str) -> str:
        """The folder this method probes: ``--checkpoint`` itself, or its ``checkpoint-N`` for ``-stepN``."""
        return checkpoint if self.step is None else f"{checkpoint.rstrip('/')}/checkpoint-{self.step}"


def parse_method(name: str) -> Method:
    match = _METHOD.fullmatch(name)
    if not match:
        raise ValueError(
            f"unknown method {name!r}: use 0shot, 1shot..{SHOT_POOL_SIZE}shot, finetuned, "
            "finetuned-stepN (a checkpoint of --checkpoint) or finetuned-TAG"
        )
    if match["k"] is None:
        return Method(name, 0, True, int(match["step"]) if match["step"] else None)
    k = int(match["k"])
    if k > SHOT_POOL_SIZE:
        raise ValueError(f"method {name!r}: k={k} exceeds the shot pool of {SHOT_POOL_SIZE} examples per subject")
    return Method(name, k, False)
