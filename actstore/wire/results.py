"""Analysis results in a ``Job`` message: encoded by the server from its outcomes (and by the study from
results stored beside a run), decoded by the client into an xarray Dataset, assignments and dendrograms."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from actstore.v1 import actstore_pb2 as pb

METRICS = (
    "id",
    "id_2nn",
    "n_clusters",
    "core_fraction",
    "ari_subject",
    "ari_answer",
    "ari_prediction",
    "overlap_subject",
    "overlap_answer",
)


COMPARISON_METRICS = ("n_common", "data_overlap", "ari_clusters")


def job_fields(layers: Iterable[Any], comparisons: Iterable[Any]) -> dict[str, list]:
    """The ``results`` and ``comparisons`` fields of a Job message holding these outcomes: ``layers`` are
    ``actstore.analysis.scheduler.LayerOutcome``, ``comparisons`` its ``ComparisonOutcome`` (taken by their
    fields, so that the client, which only decodes, needs none of the analysis stack)."""
    return {"results": [_result(o) for o in layers], "comparisons": [_comparison(o) for o in comparisons]}


def _comparison(o: Any) -> pb.LayerComparison:
    out = pb.LayerComparison(runs=run_pair(o.a, o.b), layer=o.layer, error=o.error or "")
    if o.result is not None:
        out.MergeFrom(
            pb.LayerComparison(
                n_common=o.result.n_common, data_overlap=o.result.data_overlap, ari_clusters=o.result.ari_clusters
            )
        )
    return out


def run_ref(run: tuple[str, str]) -> pb.RunRef:
    """A (model, method) name as a message."""
    return pb.RunRef(model=run[0], method=run[1])


def run_pair(a: tuple[str, str], b: tuple[str, str]) -> pb.RunPair:
    return pb.RunPair(a=run_ref(a), b=run_ref(b))


def _result(o: Any) -> pb.LayerResult:
    out = pb.LayerResult(run=run_ref((o.model, o.method)), layer=o.layer, error=o.error or "")
    if o.result is not None:
        r = o.result
        out.MergeFrom(
            pb.LayerResult(
                id=r.id,
                ids_gride=r.ids_gride.tolist(),
                id_2nn=r.id_2nn,
                n_clusters=r.n_clusters,
                core_fraction=r.core_fraction,
                ari_subject=r.ari_subject,
                ari_answer=r.ari_answer,
                ari_prediction=r.ari_prediction,
                overlap_subject=r.overlap_subject,
                overlap_answer=r.overlap_answer,
                sample_ids=o.sample_ids.tolist(),
                assignment=r.assignment.tolist(),
            )
        )
    if o.dendrogram is not None:
        d = o.dendrogram
        out.dendrogram.CopyFrom(
            pb.Dendrogram(
                clusters=d.clusters.tolist(),
                sizes=d.sizes.tolist(),
                labels=d.labels,
                linkage=d.linkage.ravel().tolist(),
                majority_share=d.majority_share.tolist(),
            )
        )
    return out


def settings_message(
    params: dict[str, float], compare_k: int, per_subject: int | None, smallest_run_samples: int
) -> pb.AnalysisSettings:
    """What a job's analyses run with: ``params`` as ``dataclasses.asdict`` gives an
    ``actstore.analysis.params.DensityParams``, every value filled in."""
    settings = pb.AnalysisSettings(
        params=pb.AnalysisParams(**params), compare_k=compare_k, smallest_run_samples=smallest_run_samples
    )
    if per_subject is not None:
        settings.per_subject = per_subject
    return settings


def settings_attrs(settings: pb.AnalysisSettings) -> dict[str, float]:
    """The settings as a results table's attributes (``per_subject`` only when a mask was asked for)."""
    values = {field.name: value for field, value in settings.params.ListFields()}
    values |= {"compare_k": settings.compare_k, "smallest_run_samples": settings.smallest_run_samples}
    return values | ({"per_subject": settings.per_subject} if settings.HasField("per_subject") else {})


def dendrogram_of(job: pb.Job, run: str, layer: int) -> dict[str, Any] | None:
    """The dendrogram of one layer of one run (``"model/method"``) in a job's results, or None when fewer
    than two clusters have more than 30 points: ``linkage`` is ready for
    ``scipy.cluster.hierarchy.dendrogram(linkage, labels=labels)``; ``labels`` are majority subjects,
    holding ``majority_share`` of each cluster."""
    d = layer_result(job, run, layer).dendrogram
    if not d.clusters:
        return None
    return {
        "clusters": np.asarray(d.clusters),
        "sizes": np.asarray(d.sizes),
        "labels": list(d.labels),
        "majority_share": np.asarray(d.majority_share),
        "linkage": np.asarray(d.linkage).reshape(-1, 4),
    }


def layer_result(job: pb.Job, run: str, layer: int) -> pb.LayerResult:
    for r in job.results:
        if _name(r.run) == run and r.layer == layer and not r.error:
            return r
    raise KeyError(f"no result for {run} layer {layer} in job {job.job_id or '(stored results)'}")


def results_dataset(job: pb.Job) -> xr.Dataset:
    """A job's results as a Dataset: metrics over (run, layer) and comparisons over (pair, layer, named
    "model/a vs model/b"), NaN where a task failed (its reason in ``error`` / ``compare_error``); the
    settings they were computed with, when the job says, as attributes (``maxk``, ``compare_k``...)."""
    layers = sorted({r.layer for r in [*job.results, *job.comparisons]})
    runs = _table(job.results, lambda r: _name(r.run), layers, METRICS, "run", "error")
    pairs = _table(
        job.comparisons,
        lambda c: f"{_name(c.runs.a)} vs {_name(c.runs.b)}",
        layers,
        COMPARISON_METRICS,
        "pair",
        "compare_error",
    )
    settings = settings_attrs(job.settings) if job.HasField("settings") else {}
    return xr.merge([runs, pairs]).assign_attrs(job_id=job.job_id, **settings)


def _table(
    results: Sequence[Any], row: Callable[[Any], str], layers: list[int], metrics: Sequence[str], dim: str, error: str
) -> xr.Dataset:
    rows = sorted({row(r) for r in results})
    table = {m: np.full((len(rows), len(layers)), np.nan) for m in metrics}
    errors = np.full((len(rows), len(layers)), "", dtype=object)
    for r in results:
        i, j = rows.index(row(r)), layers.index(r.layer)
        errors[i, j] = r.error
        if not r.error:
            for m in metrics:
                table[m][i, j] = getattr(r, m)
    if not rows:
        return xr.Dataset()
    return xr.Dataset(
        {m: ((dim, "layer"), v) for m, v in table.items()} | {error: ((dim, "layer"), errors)},
        coords={dim: rows, "layer": layers},
    )


def _name(ref: pb.RunRef) -> str:
    return f"{ref.model}/{ref.method}"
