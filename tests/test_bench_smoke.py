"""Every benchmark in bench/ still runs: each script at a tiny size in a subprocess, as a user would run it.

The figures are not checked (they mean nothing at this size); a script that no longer imports, or fails
on its own assertions, fails here. To cover a new script, add one line to BENCHES.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actstore.cli import main

ROOT = Path(__file__).resolve().parents[1]
STORE = "{store}"  # replaced by a store holding a tiny-llama 0shot run

BENCHES = {  # script: its arguments at a tiny size
    "serve.py": ["--store", STORE, "--samples", "100", "--repeats", "1", "--fetches", "3"],
    "layout.py": ["--store", STORE, "--samples", "100"],
    "analysis.py": ["--dims", "576", "--samples", "600"],  # at 300 (~5 per subject) its overlap check fails
    "ingest.py": ["--limit", "2", "--repeats", "1"],  # the packaged SmolLM2 on 2 questions
    "capture.py": ["--limit", "2", "--repeats", "1", "--no-sizes"],  # the packaged SmolLM2 on 2 texts
    "feed.py": [  # the packaged SmolLM2 on 2 texts (one context of 128 tokens), 256 synthetic tokens
        "--limit",
        "2",
        "--synthetic-tokens",
        "256",
        "--batch-size",
        "128",
        "--buffer-size",
        "256",
        "--repeats",
        "1",
        "--sample-mb",
        "1",
    ],
    "finetune.py": [
        "--subjects",
        "world_religions",
        "--train-pool",
        "2",
        "--epochs",
        "1",
        "--repeats",
        "1",
        "--probes",
        "4",
    ],
    "load.py": ["--seconds", "3", "--clients", "4", "--stalled", "1", "--samples", "500"],
    "objectstore.py": ["--layers", "3", "--samples", "256", "--hidden", "64", "--repeats", "1", "--fetches", "3"],
}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_model, questions_file) -> Path:
    store = tmp_path_factory.mktemp("bench") / "store"
    assert (
        main(
            [
                "ingest",
                "--store",
                str(store),
                "--model",
                str(tiny_model),
                "--dataset",
                str(questions_file),
                "--dtype",
                "float32",
                "--methods",
                "0shot",
                "--per-subject",
                "4",
            ]
        )
        == 0
    )
    return store


def test_every_bench_script_is_listed():
    assert sorted(BENCHES) == sorted(p.name for p in (ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("script", sorted(BENCHES))
def test_bench_runs_at_a_tiny_size(script, tiny_store, tmp_path):
    args = [str(tiny_store) if a == STORE else a for a in BENCHES[script]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # this checkout's actstore
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=tmp_path,
        timeout=600,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, f"bench/{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"bench/{script} printed nothing"
