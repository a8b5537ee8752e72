"""Runs to and from the formats other tools read: ``export`` a selection of a run to Parquet, a Hugging Face
``datasets`` folder or netCDF, its recipe and provenance along; ``import`` an Arrow cache made elsewhere
(SAELens') or by ``export`` into a run. Reads and writes runs through actstore.store only.

pyarrow and datasets (the ``ingest`` extra) are imported by the formats that need them, when used.
"""

from actstore.exchange.cache_import import IMPORT_FORMATS, Imported, import_cache
from actstore.exchange.export import FORMATS, export_run
from actstore.exchange.selection import ExchangeError, Selection, select

__all__ = [
    "FORMATS",
    "IMPORT_FORMATS",
    "ExchangeError",
    "Imported",
    "Selection",
    "export_run",
    "import_cache",
    "select",
]
