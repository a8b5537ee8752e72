"""A study's results read back from a store, without a server and without computing anything."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from actstore.analysis.density import PAPER, DensityParams
from actstore.analysis import NotAnalysed
from actstore.analysis.layers import Mask
from actstore.analysis.scheduler import comparison_outcome, layer_outcome
from actstore.store import Store
from actstore.study.report import write_results
from actstore.v1 import actstore_pb2 as pb
from actstore.wire.results import dendrogram_of, job_fields, results_dataset


def plot_stored(store_url: str | os.PathLike[str], model: str, methods: list[str] | None, out: Path,
                compare: list[tuple[str, str]] | None = None, params: DensityParams = PAPER,
                mask: Mask = Mask()) -> list[Path]:
    """Write the study's figures, tables and summary for ``model``'s runs from the analyses stored with
    them (layers 1 to the last); raise NotAnalysed naming what is missing."""
    store = Store(store_url)
    runs = {run.method: run for run in store.runs() if run.model == model}
    if not runs:
        raise NotAnalysed(f"no runs of model {model!r} in {store.url}")
    methods = methods or sorted(runs)
    unknown = [m for m in methods if m not in runs]
    if unknown:
        raise NotAnalysed(f"no run {model}/{unknown[0]} in {store.url}; runs of {model}: {', '.join(sorted(runs))}")
    layers = range(1, min(runs[m].shape[0] for m in methods))
    outcomes, missing = {}, []
    for method in methods:
        for layer in layers:
            try:
                outcomes[method, layer] = layer_outcome(store, model, method, layer, params, mask, compute=False)
            except NotAnalysed:
                missing.append(f"{method} layer {layer}")
    if compare is None:
        compare = [("0shot", "5shot"), ("0shot", "finetuned"), ("5shot", "finetuned")]
    pairs = [pair for pair in compare if set(pair) <= set(methods)]
    comparisons = []
    for pair in pairs if not missing else []:
        for layer in layers:
            try:
                comparisons.append(comparison_outcome(store, outcomes[pair[0], layer], outcomes[pair[1], layer],
                                                      params, mask, compute=False))
            except NotAnalysed:
                missing.append(f"{' vs '.join(pair)} layer {layer}")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        compared = "".join(f" --compare {','.join(pair)}" for pair in pairs)
        raise NotAnalysed(f"no stored analyses (preset paper) for {model}: {shown}. Compute them with `actstore "
                          f"study` or `actstore analyze {model} --methods {','.join(methods)}{compared}` on a server "
                          "of this store")
    job = pb.Job(**job_fields(outcomes.values(), comparisons))
    training = {m: runs[m].attrs["finetune"] for m in methods if runs[m].attrs.get("finetune")}
    return write_results(out, model, results_dataset(job), {m: runs[m].accuracy for m in methods},
                         {m: runs[m].n_samples for m in methods}, functools.partial(dendrogram_of, job), training)
