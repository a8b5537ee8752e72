"""Running layer analyses in parallel on Dask: one task per (run, layer), one per compared pair at a layer.

By default a local cluster of worker processes sized to the machine, one thread each, with BLAS and
DADApy limited to one thread per worker so that n workers use n cores and nothing oversubscribes them.
An address runs the same tasks on an existing Dask distributed cluster instead.

Dask runs tasks of equal priority first in, first out, so one owner's long jobs would hold every
worker until they end. ``FairShares`` gives each owner's tasks Dask priorities that interleave them
instead: a newcomer's first task runs as soon as a worker frees up (see its docstring).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from distributed import Client, Future, SpecCluster, Status, as_completed
from threadpoolctl import threadpool_limits

from actstore.analysis import NotAnalysed
from actstore.analysis.compare import OVERLAP_K, Dendrogram, LayerComparison, density_peak_dendrogram
from actstore.analysis.density import Clusters, DensityParams, LayerDensity
from actstore.analysis.layers import Mask, analyse, compare
from actstore.analysis.tokens import Reduction, TokenCloud, analyse_tokens
from actstore.pools import cores
from actstore.store import CorruptData, Store

log = logging.getLogger(__name__)

RunName = tuple[str, str]  # (model, method)


CONNECT_S = 10.0  # a scheduler that does not answer within this is reported unreachable


class _NoDashboardLine(logging.Filter):
    """Drops Dask's "dashboard at: URL" lines: the local cluster opens no dashboard (only Dask's health and
    metrics endpoints answer there), so the URL they advertise answers 404."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "dashboard at:" not in record.getMessage()


for _name in ("distributed.scheduler", "distributed.worker"):
    logging.getLogger(_name).addFilter(_NoDashboardLine())


def dask_client(address: str | None = None, n_workers: int | None = None, timeout: float = CONNECT_S) -> Client:
    """A client of the cluster at ``address``, or of a new local one (workers = cores, 1 thread each);
    raises OSError (or TimeoutError) when the scheduler at ``address`` does not answer within ``timeout``."""
    if address:
        return Client(address, timeout=timeout)
    # made by the Client, the local cluster is closed with it (a Client given a cluster leaves it running)
    return Client(n_workers=n_workers or cores(), threads_per_worker=1, processes=True, dashboard_address=None)


def restore_workers(client: Client) -> int:
    """Bring the client's local cluster back to its size; returns how many workers were missing.

    A nanny restarts its worker process after a crash, but gives up when the process is killed again
    while starting (or when its restart collides with the old worker's registration); the cluster then
    keeps the dead nanny, or drops it a while later, and, left alone, runs on fewer workers, down to
    none, with every task queued forever. An external cluster is its operator's to keep: 0 for it."""
    cluster = client.cluster
    if cluster is None or cluster.status != Status.running:
        return 0
    dead = [name for name, nanny in list(cluster.workers.items()) if nanny.status in _GONE]
    missing = len(cluster.worker_spec) - len(cluster.workers) + len(dead)
    if missing > 0:
        cluster.loop.add_callback(_restore, cluster, dead)  # on the cluster's own thread, which owns its state
    return missing


_GONE = {Status.closing, Status.closed, Status.failed}


def _restore(cluster: SpecCluster, dead: list) -> None:
    for name in dead:
        if name in cluster.workers and cluster.workers[name].status in _GONE:
            del cluster.workers[name]
    cluster.scale(len(cluster.worker_spec))  # the same size: starts the workers the spec has and it lacks


@dataclass
class LayerOutcome:
    model: str
    method: str
    layer: int
    result: LayerDensity | None
    sample_ids: np.ndarray | None  # ids of the samples the result covers (mask applied, duplicates dropped)
    error: str | None
    dendrogram: Dendrogram | None = None  # None also when fewer than two clusters are large enough


@dataclass
class ComparisonOutcome:
    a: RunName
    b: RunName
    layer: int
    result: LayerComparison | None
    error: str | None


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def layer_outcome(
    store: Store, model: str, method: str, layer: int, params: DensityParams, mask: Mask, compute: bool = True
) -> LayerOutcome:
    """One (run, layer) analysis with its dendrogram; an error becomes the outcome's ``error``, except
    NotAnalysed (no stored result and ``compute`` off) and CorruptData (stored bytes fail verification:
    the whole job must fail loudly, not list it among results), which are raised."""
    try:
        run = store.run(model, method)
        if run.capture is not None:
            cloud = analyse_tokens(run, layer, Reduction.parse(mask.reduction), params, mask.site, mask.label, compute)
            return LayerOutcome(model, method, layer, _as_layer_density(cloud), cloud.samples, None)
        result, positions = analyse(run, layer, params, mask, compute)
        labels = run.labels()
    except (NotAnalysed, CorruptData):
        raise
    except Exception as exc:  # a failed layer reports its error; the others go on
        log.exception("layer %d of %s/%s failed", layer, model, method)
        return LayerOutcome(model, method, layer, None, None, _error(exc))
    try:
        dendrogram = density_peak_dendrogram(result, labels["subject"][positions])
    except ValueError:  # too few large clusters to draw one
        dendrogram = None
    return LayerOutcome(model, method, layer, result, labels["sample"][positions], None, dendrogram)


def _as_layer_density(cloud: TokenCloud) -> LayerDensity:
    """A token cloud's results in the study's terms: the ARI and overlap with its label as the subject's, the
    answer's and the prediction's undefined (NaN)."""
    nan = float("nan")
    return LayerDensity(
        **{field.name: getattr(cloud, field.name) for field in dataclasses.fields(Clusters)},
        ari_subject=nan if cloud.ari is None else cloud.ari,
        ari_answer=nan,
        ari_prediction=nan,
        overlap_subject=nan if cloud.overlap is None else cloud.overlap,
        overlap_answer=nan,
    )


def comparison_outcome(
    store: Store,
    a: LayerOutcome,
    b: LayerOutcome,
    params: DensityParams,
    mask: Mask,
    k: int = OVERLAP_K,
    compute: bool = True,
) -> ComparisonOutcome:
    """Two runs compared at the layer of their outcomes (reusing their cached analyses)."""
    names, layer = ((a.model, a.method), (b.model, b.method)), a.layer
    failed = [f"{o.model}/{o.method}: {o.error}" for o in (a, b) if o.error]
    if failed:
        return ComparisonOutcome(*names, layer, None, "; ".join(failed))
    try:
        result = compare(store.run(*names[0]), store.run(*names[1]), layer, params, mask, k, compute)
    except (NotAnalysed, CorruptData):
        raise
    except Exception as exc:
        log.exception("comparing %s with %s at layer %d failed", *names, layer)
        return ComparisonOutcome(*names, layer, None, _error(exc))
    return ComparisonOutcome(*names, layer, result, None)


def _task(store: str, model: str, method: str, layer: int, params: DensityParams, mask: Mask) -> LayerOutcome:
    with threadpool_limits(limits=1):
        return layer_outcome(Store(store), model, method, layer, params, mask)


def _compare_task(
    store: str, a: LayerOutcome, b: LayerOutcome, params: DensityParams, mask: Mask, k: int
) -> ComparisonOutcome:
    """Runs after both runs' analyses of the layer (their outcomes are its inputs)."""
    with threadpool_limits(limits=1):
        return comparison_outcome(Store(store), a, b, params, mask, k)


def submit_layers(
    client: Client,
    store: str | Path,
    runs: list[RunName],
    layers: list[int],
    params: DensityParams,
    mask: Mask = Mask(),
    pairs: list[tuple[RunName, RunName]] = (),
    k: int = OVERLAP_K,
    priority: int = 0,
) -> list[Future]:
    """One task per (run, layer), for ``runs`` and the runs of ``pairs``, and one per (pair, layer)
    after its two analyses. Results: LayerOutcome or ComparisonOutcome. The i-th task returned has Dask
    priority ``priority - i`` (higher runs first): a job's own tasks in this order, and a caller that
    interleaves several jobs picks each one's ``priority`` (see FairShares)."""
    tag = os.urandom(4).hex()
    every = list(dict.fromkeys([*runs, *(run for pair in pairs for run in pair)]))
    units = [(run, layer) for run in every for layer in layers]
    analyses = {
        (run, layer): client.submit(
            _task,
            str(store),
            *run,
            layer,
            params,
            mask,
            pure=False,
            key=f"actstore-{run[0]}-{run[1]}-{layer}-{tag}",
            priority=priority - i,
        )
        for i, (run, layer) in enumerate(units)
    }
    comparisons = [
        client.submit(
            _compare_task,
            str(store),
            analyses[a, layer],
            analyses[b, layer],
            params,
            mask,
            k,
            pure=False,
            key=f"actstore-compare-{a[0]}-{a[1]}-{b[0]}-{b[1]}-{layer}-{tag}",
            priority=priority - len(units) - i,
        )
        for i, ((a, b), layer) in enumerate((pair, layer) for pair in pairs for layer in layers)
    ]
    return [*analyses.values(), *comparisons]


class FairShares:
    """Dask priorities that share the workers among owners (groups, or open callers) in turn.

    Every task gets a band, and priority -band (a lower band runs first). An owner's tasks take
    consecutive bands, starting from the later of its own next band and the clock: the lowest band still
    outstanding anywhere. So an owner arriving while another has hundreds of tasks queued starts level
    with the one running now, and the two alternate from there (equal bands run in submission order):
    its first task waits only for a worker to free up, never behind the queue. Tasks already running are
    not interrupted, so a newcomer's wait is bounded by the remaining time of one running task.

    Thread-safe: bands are taken by the dispatcher and given back on Dask's callback thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[str, int] = {}  # each owner's next band, while it has tasks outstanding
        self._owners: Counter[str] = Counter()  # outstanding tasks per owner
        self._bands: Counter[int] = Counter()  # outstanding tasks per band

    def take(self, owner: str, n: int) -> int:
        """The first of ``n`` consecutive bands for ``owner``'s next tasks; give each back with ``give_back``
        once its task ended (done, failed or cancelled)."""
        with self._lock:
            clock = min(self._bands) if self._bands else 0
            first = max(self._next.get(owner, 0), clock)
            self._next[owner] = first + n
            self._owners[owner] += n
            self._bands.update(range(first, first + n))
            return first

    def give_back(self, owner: str, band: int) -> None:
        with self._lock:
            self._bands[band] -= 1
            if not self._bands[band]:
                del self._bands[band]
            self._owners[owner] -= 1
            if not self._owners[owner]:  # an owner back with nothing outstanding starts level with the clock
                del self._owners[owner], self._next[owner]


def analyse_layers(
    client: Client,
    store: str | Path,
    runs: list[RunName],
    layers: list[int],
    params: DensityParams,
    mask: Mask = Mask(),
    pairs: list[tuple[RunName, RunName]] = (),
    k: int = OVERLAP_K,
) -> Iterator[LayerOutcome | ComparisonOutcome]:
    """Submit the tasks (see submit_layers) and yield their outcomes as they finish (not in order)."""
    futures = submit_layers(client, store, runs, layers, params, mask, pairs, k)
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.cancel([f for f in futures if not f.done()])
