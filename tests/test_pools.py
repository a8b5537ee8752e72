"""Thread pools are sized by the cores a process may run on: a container or ``taskset`` gives it fewer than
the machine has, and a pool per machine CPU would crowd them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from actstore.pools import cores


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_cores_follow_the_processs_cpu_affinity():
    assert cores() == len(os.sched_getaffinity(0))
    pinned = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from actstore.pools import cores; "
    code = pinned + "from actstore.client import states; print(cores(), states._DECODE._args['max_workers'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"], out
