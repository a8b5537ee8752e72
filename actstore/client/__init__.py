"""The actstore client: ``Client(address, token=...)`` returns runs, labels and states as xarray objects."""

from actstore.client.client import Client
from actstore.client.errors import ActstoreError
from actstore.client.jobs import AnalysisJob

__all__ = ["ActstoreError", "AnalysisJob", "Client"]
