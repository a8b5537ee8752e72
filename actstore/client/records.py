"""The catalog's answers (run summaries and descriptions) as plain dicts, ready for a table or JSON."""

from __future__ import annotations

import json

from actstore.protocol import VISIBILITY_NAMES
from actstore.v1 import actstore_pb2 as pb

KINDS = {pb.RUN_KIND_QUESTIONS: "questions", pb.RUN_KIND_CAPTURE: "capture"}


def run_summary(s: pb.RunSummary) -> dict:
    """A run's summary; ``n_samples`` counts its rows (a capture run's tokens where ``row_dim`` is "token"),
    ``n_texts`` its texts; ``kind``, ``sites``, ``row_dim``, ``n_texts`` and ``store_dtype`` are None from a
    server that predates capture runs."""
    known = s.kind != pb.RUN_KIND_UNSPECIFIED
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
        "kind": KINDS.get(s.kind),
        "sites": [
            {"name": site.name, "n_layers": site.n_layers, "width": site.width, "dims": list(site.dims)}
            for site in s.sites
        ]
        if known
        else None,
        "row_dim": s.row_dim if known else None,
        "n_texts": s.n_texts if known else None,
        "store_dtype": s.store_dtype if known else None,
    }


def run_info(info: pb.RunInfo) -> dict:
    return {
        **run_summary(info.summary),
        "dtype": info.dtype,
        "layers": list(info.layers),
        "labels": {lv.name: list(lv.values) for lv in info.labels},  # a capture run's: its label columns
        "labels_truncated": [lv.name for lv in info.labels if lv.truncated],
        "size_bytes": info.size_bytes,
        "recipe": json.loads(info.recipe_json or "{}"),
        "attributes": json.loads(info.attributes_json or "{}"),
    }
