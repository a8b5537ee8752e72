"""What a new user meets in their first hour, tried as they would: no dead end, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m actstore ARGS`` with its stdout a pipe whose reader is gone, as in ``... | head -0``."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "actstore", *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(write)


def test_output_piped_into_a_reader_that_stops_prints_no_traceback(tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    result = _into_closed_pipe("ls", "--store", str(store))
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert result.returncode == 141, (result.returncode, result.stderr)


def test_no_log_line_advertises_a_dashboard_that_does_not_answer(caplog):
    """The local Dask cluster opens no dashboard; Dask still logged "dashboard at: http://...", a 404."""
    import logging

    from actstore.analysis.scheduler import dask_client

    with caplog.at_level(logging.INFO), dask_client(n_workers=1):
        pass
    assert "Scheduler at" in caplog.text or "distributed" in caplog.text  # Dask did log its start here
    assert "dashboard at" not in caplog.text


def test_the_objects_a_user_holds_say_what_they_are(tmp_path):
    """Typing a name at the prompt shows what it is: the store, a run's shape and state, the client's
    address (never its token), a job's id and state."""
    import numpy as np

    from actstore.client import AnalysisJob, Client
    from actstore.server.process import ServerProcess
    from actstore.store import Store

    store = Store(tmp_path / "store")
    n = 12
    text = np.array(["s"] * n, dtype=object)
    with store.writer("m", "0shot", recipe={"r": 1}, attrs={}, n_layers=2, hidden=8) as writer:
        writer.add(
            np.zeros((2, n, 8), np.float32),
            {
                "sample": np.arange(n),
                "subject": text,
                "answer": text,
                "prediction": text,
                "correct": np.ones(n, dtype=bool),
            },
        )
    run = store.run("m", "0shot")
    assert repr(store) == f"Store({str(tmp_path / 'store')!r})"
    assert repr(run).startswith("<Run m/0shot: 2 layers x 12 samples x 8, complete, accuracy 1.000; store ")
    with ServerProcess(store.url, tmp_path / "server.log") as server:
        with Client(server.address, token="a-secret-token-of-16+") as client:
            shown = repr(client)
            assert shown == f"<Client {server.address} (with token, plaintext)>" and "secret" not in shown
            assert repr(AnalysisJob(client, "j1")) == f"<AnalysisJob j1 on {server.address}: not waited on>"
