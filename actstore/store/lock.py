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
    """Holds ``flock(LOCK_EX)`` on a directory until released or the process ends.

    With ``create``, missing folders are made first, and those still empty at release are removed
    again: a lock taken for a run that was never written (the model failed to load) leaves nothing.
    """

    def __init__(self, folder: Path, what: str, create: bool = False) -> None:
        self._made = _make_folders(folder) if create else []
        self._fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise RunLocked(f"{what} is being written by another process; wait for it to finish") from None

    def check(self) -> None:
        """Nothing to check: the kernel holds the lock until ``release`` or the holder's death."""

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
            for folder in self._made:  # deepest first
                try:
                    folder.rmdir()
                except OSError:  # written meanwhile: kept
                    break


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones made, deepest first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing
