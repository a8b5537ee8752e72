"""``actstore serve`` in a subprocess on a free local port: what the study job talks to, and the tests."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """A server on ``store`` (a folder or s3://bucket/prefix) started on ``address`` (port 0: a free one),
    its output in ``log``; stopped with SIGTERM, which lets it finish in-flight calls and shut its Dask
    workers down."""

    def __init__(self, store: str | Path, log: Path, *extra: str, address: str = "127.0.0.1:0") -> None:
        self.store, self.log = store, log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actstore", "serve", "--store", str(store), "--address", address, *extra],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.port = self._wait_for_port()
        self.address = f"127.0.0.1:{self.port}"

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = re.search(r"on 127\.0\.0\.1:(\d+)", self.log.read_text())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited at start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"the server did not start within 60 s; its output is in {self.log}")

    def output(self) -> str:
        return self.log.read_text()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def wait(self, timeout: float = 60) -> int:
        """Wait for the server to exit by itself (after a signal already sent)."""
        code = self.proc.wait(timeout=timeout)
        self._log_file.close()
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self._log_file.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
