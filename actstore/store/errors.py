"""Errors the store raises; each names what went wrong and what to do about it."""

ECHO_CHARS = 64


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message that quotes what a caller sent must not
    grow with it (a 20,000-character name would otherwise come back whole, past gRPC's metadata limits)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


class StoreError(Exception):
    """Base class for every error the store raises on purpose."""


class InvalidName(StoreError, ValueError):
    """A model or method name that could escape the store root or is not portable."""


class RunNotFound(StoreError, KeyError):
    """The requested run does not exist in this store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class NameNotHeld(StoreError, KeyError):
    """A name of something a run holds (a site, a label) that it does not hold; the message lists those it
    does, so one reading fixes every mistaken name."""

    kind = "name"

    def __init__(self, run: str, name: str | None, held: list[str]) -> None:
        super().__init__(f"run {run} has no {self.kind} {echo(name)}; its {self.kind}s: {', '.join(held) or 'none'}")
        self.run, self.name, self.held = run, name, held

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])

    def __reduce__(self) -> tuple:  # pickled whole: Dask workers send errors back to the client
        return type(self), (self.run, self.name, self.held)


class SiteNotFound(NameNotHeld):
    """The run holds no states of the requested site."""

    kind = "site"


class LabelNotFound(NameNotHeld):
    """The run has no label (coordinate) of the requested name."""

    kind = "label"


class RunLocked(StoreError):
    """Another process holds the run for writing."""


class RecipeMismatch(StoreError):
    """The run exists with a different recipe; resuming into it would mix two experiments."""


class StoreNotWritable(StoreError):
    """The store root cannot be created or written."""


class NotEnoughSpace(StoreError):
    """What a job is about to write would not fit on the store's disk: refused before anything is written."""


class CorruptData(StoreError):
    """Stored bytes fail verification (checksum, size or decoding): the message names the run, layer and
    sample range, so an operator knows what to restore or re-ingest."""


class RefusedEntry(StoreError):
    """A file the store will not open: a link that leads out of the store's root, something other than a
    regular file (a FIFO would block the reading thread forever, a device would be read without end), or a
    metadata file larger than any real one. The message names the key, which names the run; it never says
    where a link leads (callers of a server are not told about its file system)."""

    def __init__(self, key: str, store: str, what: str) -> None:
        super().__init__(
            f"{key} in store {store} is {what}; the store opens only regular files inside its root: "
            "replace it with the file itself, or restore the run's files from a backup"
        )
        self.key, self.store, self.what = key, store, what

    def __reduce__(self) -> tuple:  # pickled whole: Dask workers send errors back to the client
        return type(self), (self.key, self.store, self.what)


class DamagedRun(CorruptData):
    """A run whose metadata cannot be read (cut short, not JSON, refused, or naming arrays that are gone):
    listings leave it out and every read of it raises this, naming it. ``access`` holds the run's access
    attributes when they could still be read (a server checks them before saying that a run exists), else
    None."""

    def __init__(self, message: str, access: dict | None = None) -> None:
        super().__init__(message)
        self.access = access

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.access)
