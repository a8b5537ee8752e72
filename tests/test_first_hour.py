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
        return subprocess.run([sys.executable, "-m", "actstore", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)


def test_output_piped_into_a_reader_that_stops_prints_no_traceback(tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    result = _into_closed_pipe("ls", "--store", str(store))
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert result.returncode == 141, (result.returncode, result.stderr)
