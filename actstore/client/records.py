"""The catalog's answers (run summaries and descriptions) as plain dicts, ready for a table or JSON."""

from __future__ import annotations

import json

from actstore.protocol import VISIBILITY_NAMES
from actstore.v1 import actstore_pb2 as pb


def run_summary(s: pb.RunSummary) -> dict:
    return {
        "model": s.run.model,
        "method": s.run.method,
        "n_layers": s.n_layers,
        "n_samples": s.n_samples,
        "hidden": s.hidden,
        "accuracy": s.accuracy if s.HasField("accuracy") else None,
        "complete": s.complete,
        "owner_group": s.access.owner_group or None,
        "visibility": VISIBILITY_NAMES.get(s.access.visibility),
        "shared_with": list(s.access.shared_with),
    }


def run_info(info: pb.RunInfo) -> dict:
    return {
        **run_summary(info.summary),
        "dtype": info.dtype,
        "layers": list(info.layers),
        "labels": {lv.name: list(lv.values) for lv in info.labels},
        "size_bytes": info.size_bytes,
        "recipe": json.loads(info.recipe_json or "{}"),
        "attributes": json.loads(info.attributes_json or "{}"),
    }
