"""The store: a folder of runs, ``{root}/{model}/{method}``, as one Zarr v3 hierarchy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zarr

from actstore.store.errors import RunNotFound, StoreNotWritable
from actstore.store.names import validate_name
from actstore.store.run import Run, RunWriter

DEFAULT_STORE = Path("actstore-data")


class Store:
    """Entry point to the runs kept under one root folder."""

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_STORE) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def runs(self) -> list[Run]:
        """Every run in the store, sorted by model then method; runs still being created are skipped."""
        found = []
        if not (self.root / "zarr.json").exists():
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

    def _open(self, model: str, method: str) -> Run | None:
        path = self.root / model / method
        if not (path / "zarr.json").exists():
            return None
        group = zarr.open_group(self.root, mode="r")[f"{model}/{method}"]
        if "recipe" not in group.attrs:  # a creation that has not finished, or not a run
            return None
        return Run(path=path, group=group, model=model, method=method)

    def ensure_writable(self) -> None:
        """Create the store if needed; raise StoreNotWritable early, before any expensive work."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            zarr.open_group(self.root, mode="a").attrs.setdefault("actstore", {"format_version": 1})
            probe = self.root / ".actstore-write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreNotWritable(f"cannot write the store at {self.root}: {exc.strerror or exc}") from None
