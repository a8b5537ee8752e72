"""A real S3 API on loopback for tests and benchmarks: moto's standalone server (``pip install 'actstore[dev]'``).

Not a mock of any client library: s3fs, boto3 and zarr talk HTTP to it as to any S3-compatible service. Its
access log has one line per request, which is how the benchmarks count the requests a read makes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from actstore.store import Store

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@dataclass
class LocalS3:
    endpoint: str
    log: Path

    def requests(self) -> int:
        """Requests served so far (lines of the access log)."""
        return sum(1 for line in self.log.read_text(errors="replace").splitlines() if '" ' in line and "HTTP/" in line)

    def create_bucket(self, name: str) -> str:
        """A new bucket; its URL ``s3://name``."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"


@contextlib.contextmanager
def local_s3(folder: Path) -> Iterator[LocalS3]:
    """moto's S3 server on a free loopback port, its log in ``folder``; the AWS variables of this process
    point at it meanwhile (subprocesses inherit them) and are restored afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = folder / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    try:
        _wait_until_up(endpoint, server, log)
        os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=endpoint)
        yield LocalS3(endpoint, log)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        server.terminate()
        server.wait(timeout=10)


def _wait_until_up(endpoint: str, server: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not start (log: {log})") from None
            time.sleep(0.1)


def write_synthetic_run(store: "Store", model: str, method: str, n_layers: int, n_samples: int, hidden: int,
                        batch: int | None = None, seed: int = 0) -> "np.ndarray":
    """A public run of standard-normal float32 states (labels: subject "s", answer "A", prediction "B") written
    through the store's run writer in batches of ``batch`` samples; returns its states. For tests and benches
    that need a run of a given size without a model."""
    import numpy as np

    states = np.random.default_rng(seed).standard_normal((n_layers, n_samples, hidden), dtype=np.float32)
    batch = batch or n_samples
    with store.writer(model, method, recipe={"synthetic": seed}, attrs={"access": {"visibility": "public"}},
                      n_layers=n_layers, hidden=hidden) as writer:
        for start in range(0, n_samples, batch):
            n = min(batch, n_samples - start)
            text = {name: np.array([value] * n, dtype=object)
                    for name, value in (("subject", "s"), ("answer", "A"), ("prediction", "B"))}
            writer.add(states[:, start : start + n], {"sample": np.arange(start, start + n), **text,
                                                      "correct": np.zeros(n, dtype=bool)})
    return states
