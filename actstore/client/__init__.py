"""The actstore client: ``Client(address, token=...)`` returns runs, labels and states as xarray objects."""

from actstore.client.client import ActstoreError, Client

__all__ = ["ActstoreError", "Client"]
