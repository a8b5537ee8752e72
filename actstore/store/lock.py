"""An exclusive, crash-proof writer lock on a run folder.

``flock`` on the folder itself: the kernel drops the lock when the holder dies (even by SIGKILL), so
a crashed ingest never leaves a stale lock behind, and no lock file litters the Zarr hierarchy.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from actstore.store.errors import RunLocked


class FolderLock:
    """Holds ``flock(LOCK_EX)`` on a directory until released or the process ends."""

    def __init__(self, folder: Path, what: str) -> None:
        self._fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RunLocked(f"{what} is being written by another process; wait for it to finish") from None

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
