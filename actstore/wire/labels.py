"""Per-sample labels in a ``Labels`` message (ReadLabels, and the header of ReadStates): encoded by the
server from a run's label arrays, decoded by the client into xarray coordinates along ``sample``."""

from __future__ import annotations

from typing import Any

import numpy as np

from actstore.v1 import actstore_pb2 as pb

LABEL_ROW_BYTES = 20  # protobuf framing of one sample's labels, beyond its strings: tags, lengths, id, flag
TEXT_LABELS = ("subject", "answer", "prediction")


def encode_labels(labels: dict[str, np.ndarray], positions: np.ndarray) -> pb.Labels:
    """The labels of the samples at ``positions`` of a run's label arrays (``Run.labels()``)."""
    return pb.Labels(
        sample=labels["sample"][positions].tolist(),
        **{name: labels[name][positions].tolist() for name in (*TEXT_LABELS, "correct")},
    )


def labels_bytes(labels: dict[str, np.ndarray], positions: np.ndarray) -> int:
    """The size of ``encode_labels(labels, positions)`` on the wire, within a few bytes a sample, without
    building it: a server refuses labels too large for one message before reading them."""
    text = sum(sum(map(len, labels[name][positions])) for name in TEXT_LABELS)
    return text + len(positions) * LABEL_ROW_BYTES


def label_coords(labels: pb.Labels) -> dict[str, Any]:
    """xarray coordinates: ``sample`` (the ids) and each label along it."""
    return {
        "sample": np.asarray(labels.sample, dtype=np.int64),
        **{
            name: ("sample", np.asarray(getattr(labels, name), dtype=str))  # object arrays deep-copy slowly
            for name in TEXT_LABELS
        },
        "correct": ("sample", np.asarray(labels.correct, dtype=bool)),
    }
