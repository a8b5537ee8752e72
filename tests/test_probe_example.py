"""The probe of docs/how-to/train.md, run as written: on a run whose subjects a layer encodes, and on a tiny
study run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from actstore.store import Store
from actstore.testing import synthetic_labels, write_synthetic_run

PAGE = Path(__file__).resolve().parent.parent / "docs" / "how-to" / "train.md"


@pytest.fixture(scope="module")
def probe_accuracy():
    """The page's ``probe_accuracy``, defined by running the page's code block that defines it."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    (code,) = [block for block in blocks if "def probe_accuracy" in block]
    namespace: dict = {}
    exec(compile(code, str(PAGE), "exec"), namespace)
    return namespace["probe_accuracy"]


def test_the_probe_finds_the_layer_that_encodes_the_subject(tmp_path, probe_accuracy):
    n, hidden = 150, 16
    rng = np.random.default_rng(0)
    subject = rng.integers(0, 3, size=n)
    states = rng.standard_normal((3, n, hidden), dtype=np.float32)
    states[1, :, :3] += 0.5 * np.eye(3, dtype=np.float32)[subject]  # weakly encoded
    states[2, :, :3] += 4.0 * np.eye(3, dtype=np.float32)[subject]  # strongly encoded
    labels = {**synthetic_labels(0, n), "subject": np.array([f"s{s}" for s in subject], dtype=object)}
    write_synthetic_run(Store(tmp_path), "m", "0shot", states=states, labels=labels)
    accuracy = [probe_accuracy(tmp_path, "m", "0shot", layer) for layer in range(3)]
    assert accuracy[0] < 0.6 and accuracy[2] > 0.95 and accuracy[0] < accuracy[1] < accuracy[2], accuracy


def test_the_probe_runs_on_a_tiny_study_run(ingest_cli, probe_accuracy):
    assert ingest_cli("--methods", "0shot") == 0
    run = Store(ingest_cli.store).runs()[0]
    accuracy = [probe_accuracy(ingest_cli.store, run.model, run.method, layer) for layer in range(run.shape[0])]
    assert len(accuracy) == run.shape[0] and all(0.0 <= a <= 1.0 for a in accuracy)
