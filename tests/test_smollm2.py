"""The real SmolLM2-135M from its PyPI package on 20 real MMLU questions (about a minute on 2 cores)."""

import numpy as np
import pytest

from actstore.cli import main
from actstore.store import Store

pytestmark = pytest.mark.slow


def test_smollm2_on_packaged_mmlu(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["ingest", "--store", str(store), "--limit", "20", "--methods", "0shot"]) == 0
    run = Store(store).run("SmolLM2-135M-Instruct.Q4_1", "0shot")
    states = run.hidden_states[:]
    assert states.shape == (31, 20, 576)  # 30 blocks + final norm, hidden 576
    assert np.isfinite(states).all()
    labels = run.labels()
    assert set(labels["prediction"]) <= set("ABCD") and len(set(labels["subject"])) >= 1
    assert 0.0 <= run.accuracy <= 1.0
    assert run.attrs["recipe"]["model_fingerprint"].startswith("sha256:")
    if run.attrs["recipe"]["compute_dtype"] == "bfloat16":  # bf16 values stored exactly as float32
        assert not (states.view(np.uint32) & 0xFFFF).any()
    # a rerun is a no-op
    assert main(["ingest", "--store", str(store), "--limit", "20", "--methods", "0shot"]) == 0
    assert "up to date" in capsys.readouterr().out
