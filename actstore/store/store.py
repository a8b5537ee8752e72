"""The store: runs ``{root}/{model}/{method}`` as one Zarr v3 hierarchy, in a folder or a bucket (location.py)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import zarr

from actstore.store.attributes import read_attr, write_attrs
from actstore.store.errors import (
    DamagedRun,
    NotEnoughSpace,
    RefusedEntry,
    RunLocked,
    RunNotFound,
    StoreError,
    StoreNotWritable,
)
from actstore.store.folder import Folder
from actstore.store.location import Location, join
from actstore.store.names import validate_name
from actstore.store.run import DEFAULT_ACCESS, VISIBILITIES, Run
from actstore.store.url import locate
from actstore.store.writer import RunWriter

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("actstore-data")
# How unreadable metadata shows itself: cut-short or foreign JSON (ValueError, zarr's errors among them),
# missing keys and arrays (KeyError), wrong types, files refused by the location (StoreError). OSError is
# not among them: a bucket that does not answer is not a damaged run.
_DAMAGE = (ValueError, KeyError, TypeError, AttributeError, IndexError, StoreError)


class Store:
    """Entry point to the runs kept under one root: a folder, or ``s3://bucket/prefix``."""

    def __init__(
        self, root: str | os.PathLike[str] | Location = DEFAULT_STORE, storage_options: dict[str, Any] | None = None
    ) -> None:
        """``storage_options``: for a bucket, s3fs's options (endpoint, credentials) where the environment's
        AWS settings are not the ones to use. An unknown URL scheme raises UnsupportedLocation."""
        self.location = locate(root, storage_options)
        self.url = self.location.url
        self._cache: dict[tuple[str, str], tuple[Any, Run]] = {}
        self._damage: dict[tuple[str, str], str] = {}  # what was last logged of each damaged run

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def exists(self) -> bool:
        """Whether the root holds a store (a mistyped path reads as an empty store otherwise)."""
        return self.location.exists("zarr.json")

    def runs(self) -> list[Run]:
        """Every run in the store, sorted by model then method; runs still being created are skipped, and so
        are damaged ones (logged when found; ``damaged_runs`` lists them): one bad run must not hide the
        others from every caller."""
        return self.scan()[0]

    def damaged_runs(self) -> list[DamagedRun]:
        """The runs whose metadata cannot be read, each as the error its reads raise (it names the run)."""
        return self.scan()[1]

    def scan(self) -> tuple[list[Run], list[DamagedRun]]:
        """(readable runs, damaged runs), each sorted by model then method."""
        found: tuple[list[Run], list[DamagedRun]] = ([], [])
        if not self.exists():
            return found
        for model in self.location.children(""):
            for method in self.location.children(model):
                try:
                    run = self._open(model, method)
                except DamagedRun as damaged:
                    found[1].append(damaged)
                    continue
                if run is not None:
                    found[0].append(run)
        return found

    def run(self, model: str, method: str) -> Run:
        """The run ``model/method``; raises RunNotFound naming what exists, DamagedRun naming a damaged one."""
        run = self._open(validate_name(model, "model name"), validate_name(method, "method"))
        if run is None:
            known = ", ".join(f"{r.model}/{r.method}" for r in self.runs()) or "none"
            raise RunNotFound(f"no run {model}/{method} in store {self.url} (runs: {known})")
        return run

    def has_run(self, model: str, method: str) -> bool:
        """Whether ``model/method`` exists, damaged or not."""
        try:
            return self._open(validate_name(model, "model name"), validate_name(method, "method")) is not None
        except DamagedRun:
            return True

    def begin_run(
        self, model: str, method: str, *, recipe: dict[str, Any], overwrite: bool = False, commit_seconds: float = 10.0
    ) -> RunWriter:
        """Take the run's writer lock now, before expensive work (loading a model), and return its writer:
        a second writer, or one of another recipe, is refused at once. ``RunWriter.start`` then lays out
        the run and publishes the session's start; closing the writer releases the lock (a folder made
        only for the lock is removed again if nothing was written in it)."""
        validate_name(model, "model name")
        validate_name(method, "method")
        self.ensure_writable()
        return RunWriter.begin(
            self.location, model, method, recipe=recipe, overwrite=overwrite, commit_seconds=commit_seconds
        )

    def writer(
        self,
        model: str,
        method: str,
        *,
        recipe: dict[str, Any],
        attrs: dict[str, Any],
        n_layers: int,
        hidden: int,
        overwrite: bool = False,
        commit_seconds: float = 10.0,
    ) -> RunWriter:
        """``begin_run`` and ``start`` at once, for writers that know the run's shapes beforehand; ``attrs``
        are recorded when the run is created (a resumed run keeps its own)."""
        writer = self.begin_run(model, method, recipe=recipe, overwrite=overwrite, commit_seconds=commit_seconds)
        try:
            writer.start(provenance=attrs, n_layers=n_layers, hidden=hidden)
        except BaseException:
            writer.close()
            raise
        return writer

    @contextlib.contextmanager
    def writing(self) -> Iterator[Store]:
        """Create the store for a job that writes runs into it, and undo that if the job fails first.

        A folder (or bucket prefix) holding other things but no store is refused before anything is written
        in it. If the job fails (or is interrupted) and the store it created holds no committed sample, what
        it created is removed, the folder too when it made it: a failed first ingest leaves nothing behind.
        """
        folder_made = isinstance(self.location, Folder) and not self.location.path.is_dir()
        fresh = not self.exists()
        if fresh and self.location.holds_other_things():
            raise StoreNotWritable(
                f"{self.url} holds other files and no actstore store; give --store a new or empty folder"
            )
        self.ensure_writable()
        try:
            yield self
        except BaseException:
            if fresh:
                self._remove_if_unused(folder_made)
            raise

    def _remove_if_unused(self, folder_made: bool) -> None:
        """Remove the store if no run holds a committed sample and no other writer is at work in it; a damaged
        run counts as holding samples (what it holds cannot be read, so it is kept)."""
        runs, damaged = self.scan()
        if damaged or any(run.n_samples for run in runs):
            return
        locks = []
        try:
            for model in self.location.children(""):
                for method in self.location.children(model):
                    locks.append(self.location.lock(join(model, method), f"run {model}/{method}"))
        except RunLocked:  # another ingest is writing into the new store: it is in use
            return
        finally:
            for lock in locks:
                lock.release()
        log.info("removing %s: the failed ingest that created it committed nothing", self.url)
        self.location.clear("")
        if folder_made:
            self.location.path.rmdir()

    def set_access(self, model: str, method: str, access: dict[str, Any]) -> Run:
        """Change who may read a run (owner, visibility, shared groups); waits for no writer, refuses if one
        holds it."""
        run = self.run(model, method)
        access = {**run.access, **access}
        if access["visibility"] not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {', '.join(VISIBILITIES)}, not {access['visibility']!r}")
        for group in [access["owner_group"], *access["shared_with"]]:
            if group is not None:
                validate_name(group, "group name")
        lock = self.location.lock(join(model, method), f"run {model}/{method}")
        try:
            writable = zarr.open_group(self.location.zarr_store(), mode="a")[f"{model}/{method}"]
            write_attrs(writable, {"access": access})
        finally:
            lock.release()
        return self.run(model, method)

    def _open(self, model: str, method: str) -> Run | None:
        """The run as of its last commit, None if there is none; raises DamagedRun if its metadata cannot be
        read. A run is reused while its metadata is unchanged (commits replace it); a damaged one is read
        again each time (its arrays may be restored without its zarr.json changing), but logged once."""
        key = join(model, method, "zarr.json")
        version = self.location.version(key)
        if version is None:
            return None
        cached = self._cache.get((model, method))
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            run = self._load(model, method)
        except DamagedRun as damaged:
            if self.location.version(key) != version:
                return None  # replaced while read: a writer creating or recreating the run right now
            self._report(model, method, damaged)
            raise
        if run is not None:
            self._cache[(model, method)] = (version, run)
            self._damage.pop((model, method), None)
        return run

    def _report(self, model: str, method: str, damaged: DamagedRun) -> None:
        """Log a damaged run once per distinct fault, not on every listing."""
        if self._damage.get((model, method)) != str(damaged):
            self._damage[(model, method)] = str(damaged)
            log.warning("%s", damaged)

    def _load(self, model: str, method: str) -> Run | None:
        """The run read from its metadata and checked for what listings and reads need; None for a creation
        that has not finished (no recipe yet); DamagedRun where something cannot be read."""
        group = None
        try:
            group = zarr.open_group(self.location.zarr_store(), path=join(model, method), mode="r")
            if "recipe" not in group.attrs:  # a creation that has not finished, or not a run
                return None
            run = Run(location=self.location, group=group, model=model, method=method)
            self._check(run)
            return run
        except _DAMAGE as exc:
            raise DamagedRun(
                f"run {model}/{method} in store {self.url} is damaged: {_reason(exc, join(model, method))}; "
                "restore its files from a backup or ingest it again (--overwrite)",
                access=_access(group),
            ) from exc

    def _check(self, run: Run) -> None:
        """Read what a listing shows and reads open first: the progress and access attributes, and every
        array's metadata, each in its own zarr.json (the group's consolidated copy would hide a missing one)."""
        for name in (*run.row_arrays, *run.state_arrays, "layer"):
            if self.location.version(join(run.key, name, "zarr.json")) is None:
                raise StoreError(f"its array {name!r} is missing")
            run.group[name].metadata  # noqa: B018 - opening it parses its metadata
        shown = (run.access, run.shape, run.complete, run.accuracy)
        log.debug("opened run %s: access, shape, complete, accuracy %s", run.key, shown)

    def check_room(self, nbytes: int, what: str, remedy: str, replacing: Sequence[tuple[str, str]] = ()) -> None:
        """Refuse (NotEnoughSpace) ``what``, about to write about ``nbytes``, where the store's disk has less free
        (counting the files of the runs ``replacing``, (model, method) each, as free): a job that would fill a
        disk is stopped before it starts, not hours in. A bucket has no such check."""
        free = self.location.free_bytes()
        if free is not None:
            free += sum(self.location.size(join(*run)) for run in replacing if self.location.exists(join(*run)))
        if free is not None and nbytes > free:
            raise NotEnoughSpace(
                f"{what} would write about {_size(nbytes)} and the disk of {self.url} has {_size(free)} free: {remedy}"
            )

    def ensure_writable(self) -> None:
        """Create the store if needed; raise StoreNotWritable early, before any expensive work."""
        try:
            self.location.check_writable()
            root = zarr.open_group(self.location.zarr_store(), mode="a")
            if "actstore" not in root.attrs:
                write_attrs(root, {"actstore": {"format_version": 1}})
        except OSError as exc:
            raise StoreNotWritable(f"cannot write the store at {self.url}: {exc.strerror or exc}") from None


def _reason(exc: Exception, run: str) -> str:
    """What was wrong, for a message that goes to callers: the store's own words, or the kind of fault
    (a JSON parser's text would quote bytes of whatever file a link pointed at)."""
    if isinstance(exc, RefusedEntry):
        return f"its {exc.key.removeprefix(run + '/')} is {exc.what}"
    if isinstance(exc, StoreError):
        return str(exc)
    if isinstance(exc, KeyError) and exc.args:
        return f"its metadata lacks {exc.args[0]!r}"
    return f"its metadata cannot be read ({type(exc).__name__})"


def _access(group: zarr.Group | None) -> dict[str, Any] | None:
    """The run's access attributes if its group could be read, else None."""
    try:
        return None if group is None else {**DEFAULT_ACCESS, **read_attr(group, "access", {})}
    except _DAMAGE:
        return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.3g} MB"
