"""The store: a folder of runs, ``{root}/{model}/{method}``, as one Zarr v3 hierarchy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zarr

from actstore.store.attributes import write_attrs
from actstore.store.errors import RunNotFound, StoreNotWritable
from actstore.store.names import validate_name
from actstore.store.lock import FolderLock
from actstore.store.run import VISIBILITIES, Run, RunWriter

DEFAULT_STORE = Path("actstore-data")


class Store:
    """Entry point to the runs kept under one root folder."""

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_STORE) -> None:
        self.root = Path(root)
        self._cache: dict[tuple[str, str], tuple[tuple[int, int, int], Run]] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def exists(self) -> bool:
        """Whether the root holds a store (a mistyped path reads as an empty store otherwise)."""
        return (self.root / "zarr.json").exists()

    def runs(self) -> list[Run]:
        """Every run in the store, sorted by model then method; runs still being created are skipped."""
        found = []
        if not self.exists():
            return found
        for model_dir in sorted(p for p in self.root.iterdir() if (p / "zarr.json").exists()):
            for run_dir in sorted(p for p in model_dir.iterdir() if (p / "zarr.json").exists()):
                run = self._open(model_dir.name, run_dir.name)
                if run is not None:
                    found.append(run)
        return found

    def run(self, model: str, method: str) -> Run:
        """The run ``model/method``; raises RunNotFound naming what exists."""
        run = self._open(validate_name(model, "model name"), validate_name(method, "method"))
        if run is None:
            known = ", ".join(f"{r.model}/{r.method}" for r in self.runs()) or "none"
            raise RunNotFound(f"no run {model}/{method} in store {self.root} (runs: {known})")
        return run

    def has_run(self, model: str, method: str) -> bool:
        return self._open(validate_name(model, "model name"), validate_name(method, "method")) is not None

    def writer(self, model: str, method: str, **kwargs: Any) -> RunWriter:
        """Open a run for appending; see RunWriter.open for the keyword arguments."""
        validate_name(model, "model name")
        validate_name(method, "method")
        self.ensure_writable()
        return RunWriter.open(self.root, model, method, **kwargs)

    def set_access(self, model: str, method: str, access: dict[str, Any]) -> Run:
        """Change who may read a run (owner, visibility, shared groups); waits for no writer, refuses if one holds it."""
        run = self.run(model, method)
        access = {**run.access, **access}
        if access["visibility"] not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {', '.join(VISIBILITIES)}, not {access['visibility']!r}")
        for group in [access["owner_group"], *access["shared_with"]]:
            if group is not None:
                validate_name(group, "group name")
        lock = FolderLock(run.path, f"run {model}/{method}")
        try:
            writable = zarr.open_group(self.root, mode="a")[f"{model}/{method}"]
            write_attrs(writable, {"access": access})
        finally:
            lock.release()
        return self.run(model, method)

    def _open(self, model: str, method: str) -> Run | None:
        """The run as of its last commit; reused while its metadata file is unchanged (commits replace it)."""
        path = self.root / model / method
        try:
            stat = (path / "zarr.json").stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get((model, method))
        if cached is not None and cached[0] == version:
            return cached[1]
        group = zarr.open_group(self.root, mode="r")[f"{model}/{method}"]
        if "recipe" not in group.attrs:  # a creation that has not finished, or not a run
            return None
        run = Run(path=path, group=group, model=model, method=method)
        self._cache[(model, method)] = (version, run)
        return run

    def ensure_writable(self) -> None:
        """Create the store if needed; raise StoreNotWritable early, before any expensive work."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(self.root, mode="a")
            if "actstore" not in root.attrs:
                write_attrs(root, {"actstore": {"format_version": 1}})
            probe = self.root / ".actstore-write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreNotWritable(f"cannot write the store at {self.root}: {exc.strerror or exc}") from None
