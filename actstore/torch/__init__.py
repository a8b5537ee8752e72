"""Stored activations as PyTorch datasets, for training probes and sparse autoencoders on them.

>>> from torch.utils.data import DataLoader
>>> from actstore.torch import activations
>>> tokens = activations("runs.zarr", "my-model", "0shot", "resid_post", 6, batch_size=4096, seed=0)
>>> for batch in DataLoader(tokens, batch_size=None, num_workers=2):
...     batch["states"]  # (4096, hidden) float32, shuffled; batch["sample"], batch["position"]: (4096,)

Needs the ``torch`` extra (``pip install actstore[torch]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

try:
    import torch  # noqa: F401
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError("actstore.torch needs PyTorch: pip install 'actstore[torch]'") from missing

from actstore.client import Client
from actstore.store import Store
from actstore.torch.rows import ActivationRows
from actstore.torch.sources import LocalSource, RemoteSource, RunChanged, RunSpec
from actstore.torch.stream import Activations

__all__ = ["ActivationRows", "Activations", "RunChanged", "activations", "rows"]

Where = Store | Client | str | os.PathLike[str]


def activations(
    store: Where,
    model: str,
    method: str | Sequence[str],
    site: str | None = None,
    layer: int | Sequence[int] = 0,
    shuffle: bool = True,
    seed: int = 0,
    *,
    labels: Sequence[str] = (),
    token: str | None = None,
    tls: bool | str = False,
    **options: Any,
) -> Activations:
    """An IterableDataset over the rows (tokens, or questions) of ``model``'s run(s) ``method`` at ``site`` (None:
    the run's first) and ``layer``: each item a dict with ``states`` (hidden,), or (layer, hidden) for a list of
    layers, the row's ``sample`` and ``position``, and the ``labels`` asked for.

    ``store``: a store (a folder or ``s3://`` URL, or a Store), or a Client of a server (``token`` and ``tls``:
    the client's, for the connection each DataLoader worker opens). Several methods read as one run.
    ``options``: Activations' (``batch_size``, ``buffer_size``, ``block_rows``, ``drop_last``, ``start``,
    ``epoch``, ``dtype``, ``rank``, ``world_size``).
    """
    methods = [method] if isinstance(method, str) else list(method)
    layers = [layer] if isinstance(layer, int) else list(layer)
    sources = [_source(store, RunSpec(model, m, site, layers, tuple(labels)), token, tls) for m in methods]
    return Activations(sources, isinstance(layer, int), shuffle=shuffle, seed=seed, **options)


def rows(
    store: Where,
    model: str,
    method: str,
    site: str | None = None,
    layer: int | Sequence[int] = 0,
    *,
    labels: Sequence[str] = (),
    token: str | None = None,
    tls: bool | str = False,
    **options: Any,
) -> ActivationRows:
    """A map-style Dataset over the rows of one run, in a store or through a server (as for ``activations``),
    items as ``activations`` gives them; a DataLoader's batch of rows is one read."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    source = _source(store, RunSpec(model, method, site, layers, tuple(labels)), token, tls)
    return ActivationRows(source, isinstance(layer, int), **options)


def _source(store: Where, spec: RunSpec, token: str | None, tls: bool | str) -> LocalSource | RemoteSource:
    if isinstance(store, Client):
        return RemoteSource(store, spec, token=token, tls=tls)
    return LocalSource(store, spec)
