"""Running layer analyses in parallel on Dask: one task per (run, layer).

By default a local cluster of worker processes sized to the machine, one thread each, with BLAS and
DADApy limited to one thread per worker so that n workers use n cores and nothing oversubscribes them.
An address runs the same tasks on an existing Dask distributed cluster instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from distributed import Client, Future, LocalCluster, as_completed
from threadpoolctl import threadpool_limits

from actstore.analysis.density import DensityParams, LayerDensity
from actstore.analysis.layers import Mask, analyse
from actstore.store import Store

log = logging.getLogger(__name__)


def dask_client(address: str | None = None, n_workers: int | None = None) -> Client:
    """A client of the cluster at ``address``, or of a new local one (workers = cores, 1 thread each)."""
    if address:
        return Client(address)
    cluster = LocalCluster(n_workers=n_workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    return Client(cluster)


@dataclass
class LayerOutcome:
    model: str
    method: str
    layer: int
    result: LayerDensity | None
    sample_ids: np.ndarray | None  # ids of the samples the result covers (mask applied, duplicates dropped)
    error: str | None


def _task(store: str, model: str, method: str, layer: int, params: DensityParams, mask: Mask) -> LayerOutcome:
    with threadpool_limits(limits=1):
        try:
            run = Store(store).run(model, method)
            result, positions = analyse(run, layer, params, mask)
            sample_ids = run.labels()["sample"][positions]
        except Exception as exc:  # a failed layer reports its error; the others go on
            log.exception("layer %d of %s/%s failed", layer, model, method)
            return LayerOutcome(model, method, layer, None, None, f"{type(exc).__name__}: {exc}")
    return LayerOutcome(model, method, layer, result, sample_ids, None)


def submit_layers(client: Client, store: Path, runs: list[tuple[str, str]], layers: list[int],
                  params: DensityParams, mask: Mask = Mask()) -> list[Future]:
    """One task per (run, layer); each future's result is a LayerOutcome."""
    return [client.submit(_task, str(store), model, method, layer, params, mask, pure=False,
                          key=f"actstore-{model}-{method}-{layer}-{os.urandom(4).hex()}")
            for model, method in runs for layer in layers]


def analyse_layers(client: Client, store: Path, runs: list[tuple[str, str]], layers: list[int],
                   params: DensityParams, mask: Mask = Mask()) -> Iterator[LayerOutcome]:
    """Submit one task per (run, layer) and yield outcomes as they finish (not in order)."""
    futures = submit_layers(client, store, runs, layers, params, mask)
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.cancel([f for f in futures if not f.done()])
