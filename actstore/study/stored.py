"""A study's results read back from a store, without a server and without computing anything.

Stored analyses are kept per settings (parameters and sample mask), so they are looked up with the settings
they were computed with: by default those of ``actstore study``, otherwise those the caller names, as
``actstore analyze`` took them.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
from pathlib import Path

from actstore.analysis import NotAnalysed
from actstore.analysis.params import MIN_SAMPLES
from actstore.analysis.scheduler import ComparisonOutcome, LayerOutcome, comparison_outcome, layer_outcome
from actstore.store import Run, Store
from actstore.study.report import STUDY, Settings, write_results
from actstore.v1 import actstore_pb2 as pb
from actstore.wire.results import dendrogram_of, job_fields, results_dataset

log = logging.getLogger(__name__)

PAIRS = [("0shot", "5shot"), ("0shot", "finetuned"), ("5shot", "finetuned")]  # the study's, where both runs exist


def plot_stored(
    store_url: str | os.PathLike[str],
    model: str,
    methods: list[str] | None,
    out: Path,
    compare: list[tuple[str, str]] | None = None,
    settings: Settings = STUDY,
    fmt: str = "png",
) -> list[Path]:
    """Write the study's figures (in ``fmt``), tables and summary for ``model``'s runs from the analyses
    stored with them under ``settings`` (layers 1 to the last); raise NotAnalysed naming what is missing and
    how to compute it."""
    store = Store(store_url)
    runs = _runs(store, model, methods)
    layers = range(1, min(run.shape[0] for run in runs.values()))
    pairs = [pair for pair in (compare or PAIRS) if set(pair) <= set(runs)]
    asked, settings = settings, settings.fitted_to(min(len(settings.mask.positions(run)) for run in runs.values()))
    log.info(
        "plot: drawing the analyses stored with %s%s%s",
        settings.name(),
        "" if settings.params == asked.params else f" ({settings.values()}, fitted to runs this small)",
        " (the study's settings; pick others with the flags they were analysed with)" if asked == STUDY else "",
    )
    outcomes, comparisons, missing = _stored(store, runs, layers, pairs, settings)
    if missing:
        raise NotAnalysed(_not_analysed(store, runs, layers, pairs, asked, settings, missing))
    job = pb.Job(**job_fields(outcomes.values(), comparisons))
    training = {m: run.attrs["finetune"] for m, run in runs.items() if run.attrs.get("finetune")}
    return write_results(
        out,
        model,
        results_dataset(job),
        {m: run.accuracy for m, run in runs.items()},
        {m: run.n_samples for m, run in runs.items()},
        functools.partial(dendrogram_of, job),
        training,
        settings=settings,
        fmt=fmt,
    )


def _runs(store: Store, model: str, methods: list[str] | None) -> dict[str, Run]:
    """``model``'s runs of ``methods`` (default: every one), by method; NotAnalysed naming an absent one."""
    runs = {run.method: run for run in store.runs() if run.model == model}
    if not runs:
        raise NotAnalysed(f"no runs of model {model!r} in {store.url}")
    unknown = [m for m in methods or [] if m not in runs]
    if unknown:
        raise NotAnalysed(f"no run {model}/{unknown[0]} in {store.url}; runs of {model}: {', '.join(sorted(runs))}")
    return {m: runs[m] for m in methods or sorted(runs)}


def _stored(
    store: Store, runs: dict[str, Run], layers: range, pairs: list[tuple[str, str]], settings: Settings
) -> tuple[dict, list[ComparisonOutcome], list[str]]:
    """The stored outcomes of every (method, layer), then of every (pair, layer) once those are all there,
    and what is missing ("5shot layer 3")."""
    outcomes: dict[tuple[str, int], LayerOutcome] = {}
    missing = []
    for method, run in runs.items():
        for layer in layers:
            try:
                outcomes[method, layer] = layer_outcome(
                    store, run.model, method, layer, settings.params, settings.mask, compute=False
                )
            except NotAnalysed:
                missing.append(f"{method} layer {layer}")
    comparisons = []
    for pair in pairs if not missing else []:
        for layer in layers:
            try:
                comparisons.append(
                    comparison_outcome(
                        store,
                        outcomes[pair[0], layer],
                        outcomes[pair[1], layer],
                        settings.params,
                        settings.mask,
                        settings.compare_k,
                        compute=False,
                    )
                )
            except NotAnalysed:
                missing.append(f"{' vs '.join(pair)} layer {layer}")
    return outcomes, comparisons, missing


def _not_analysed(
    store: Store,
    runs: dict[str, Run],
    layers: range,
    pairs: list[tuple[str, str]],
    asked: Settings,
    settings: Settings,
    missing: list[str],
) -> str:
    """What is missing and how to compute it: a command that runs as printed (with the flags ``asked``, which
    the server fits to the runs as ``settings`` are), or why none can."""
    model = next(iter(runs.values())).model
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    found = f"no stored analyses ({settings.name()}) for {model}: {shown}. "
    fewest = min(runs.values(), key=lambda run: len(settings.mask.positions(run)))
    samples = len(settings.mask.positions(fewest))
    needed = max(settings.params.maxk, settings.compare_k if pairs else 0, MIN_SAMPLES - 1)
    if samples <= needed:  # the server refuses such a job before computing anything
        return found + (
            f"These settings cannot be computed: they need more than {needed} samples per run and "
            f"{fewest.model}/{fewest.method} holds {samples}"
        )
    flags = asked.flags()
    if flags is None:
        return found + (
            f"Compute them with the Python client on a server of this store: Client.analyze("
            f"{model!r}, {list(runs)}, layers=range(1, {layers.stop}), compare={pairs}, per_subject="
            f"{asked.mask.per_subject}, **{asked.changes})"
        )
    command = [
        "actstore",
        "analyze",
        model,
        "--methods",
        ",".join(runs),
        "--layers",
        f"1:{layers.stop}",
        *(item for pair in pairs for item in ("--compare", ",".join(pair))),
        *flags,
    ]
    other = (
        (
            " Analyses stored with other settings are drawn with the flags they were computed with "
            "(see `actstore plot --help`)."
        )
        if asked == STUDY
        else ""
    )
    return found + (
        f"Compute them on a server of this store: start `actstore serve --store {shlex.quote(store.url)}`, "
        f"then run `{shlex.join(command)}`.{other}"
    )
