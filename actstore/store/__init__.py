"""The on-disk layout of actstore: the only package that opens Zarr paths.

Everything else reads and writes runs through :class:`Store`, :class:`Run` and :class:`RunWriter`.
"""

from actstore.store.errors import (
    CorruptData,
    InvalidName,
    LabelNotFound,
    NotEnoughSpace,
    RecipeMismatch,
    RunLocked,
    RunNotFound,
    SiteNotFound,
    StoreError,
    StoreNotWritable,
    echo,
)
from actstore.store.names import safe_name, validate_name
from actstore.store.run import LABELS, VISIBILITIES, Run
from actstore.store.store import DEFAULT_STORE, Store
from actstore.store.writer import RunWriter

__all__ = [
    "CorruptData",
    "DEFAULT_STORE",
    "LABELS",
    "InvalidName",
    "LabelNotFound",
    "NotEnoughSpace",
    "RecipeMismatch",
    "Run",
    "RunLocked",
    "RunNotFound",
    "RunWriter",
    "SiteNotFound",
    "Store",
    "StoreError",
    "StoreNotWritable",
    "VISIBILITIES",
    "echo",
    "safe_name",
    "validate_name",
]
