"""The API contract: generated code in step with proto/, a light client, partial runs served as such."""

import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np

from actstore.client import Client
from actstore.server.process import ServerProcess
from actstore.store import Store

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_proto(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc wrote nothing"
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"stale generated code, run `python proto/generate.py`: {stale}"


def test_the_client_imports_no_heavy_dependency():
    code = (
        "import sys; import actstore.client, actstore.cli; "
        "heavy = {'torch', 'transformers', 'dask', 'dadapy', 'jax'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_run_still_being_written_is_served_up_to_its_committed_samples(tmp_path):
    store = Store(tmp_path / "store")
    labels = {
        "sample": np.arange(4),
        "subject": np.array(["a"] * 4, dtype=object),
        "answer": np.array(["A"] * 4, dtype=object),
        "prediction": np.array(["B"] * 4, dtype=object),
        "correct": np.zeros(4, dtype=bool),
    }
    with store.begin_run("m", "0shot", recipe={"r": 1}) as writer:
        writer.start(provenance={}, n_layers=2, hidden=8, planned=100)
        writer.add(np.ones((2, 4, 8), dtype=np.float32), labels)
        writer.commit()
        writer.add(np.ones((2, 4, 8), dtype=np.float32), {**labels, "sample": np.arange(4, 8)})  # not committed
        server = ServerProcess(store.url, tmp_path / "log")
        try:
            with Client(server.address) as c:
                states = c.hidden_states("m", "0shot")
                assert states.shape == (2, 4, 8) and states.attrs["run_complete"] is False
                assert c.describe("m", "0shot")["complete"] is False
        finally:
            server.stop()
