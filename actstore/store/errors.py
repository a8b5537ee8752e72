"""Errors the store raises; each names what went wrong and what to do about it."""


class StoreError(Exception):
    """Base class for every error the store raises on purpose."""


class InvalidName(StoreError, ValueError):
    """A model or method name that could escape the store root or is not portable."""


class RunNotFound(StoreError, KeyError):
    """The requested run does not exist in this store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RunLocked(StoreError):
    """Another process holds the run for writing."""


class RecipeMismatch(StoreError):
    """The run exists with a different recipe; resuming into it would mix two experiments."""


class StoreNotWritable(StoreError):
    """The store root cannot be created or written."""


class CorruptData(StoreError):
    """Stored bytes fail verification (checksum, size or decoding): the message names the run, layer and
    sample range, so an operator knows what to restore or re-ingest."""
