"""Turning a ReadStates / ReadLabels request into layers, sample positions and a hidden slice.

Every failure names what was asked and what exists, and maps to one gRPC status (see errors.py). A capture
run's rows and site: capture_rows.py.
"""

from __future__ import annotations

import numpy as np

from actstore.store import Run, SiteNotFound, echo
from actstore.v1 import actstore_pb2 as pb

LABEL_NAMES = ("subject", "answer", "prediction", "correct")
MAX_SAMPLE_IDS = 1_000_000  # per request: ids are converted, sorted and searched before anything is read


class BadRequest(ValueError):
    """Malformed or empty selection: INVALID_ARGUMENT."""


class NotFound(LookupError):
    """A layer or sample id the run does not have: NOT_FOUND."""


def _range(r: pb.Range, size: int, what: str) -> range:
    if r.start < 0 or r.stop > size or r.start >= r.stop:
        raise BadRequest(f"{what} range {r.start}:{r.stop} is empty or outside 0:{size}")
    return range(r.start, r.stop)


def layers(request: pb.ReadStatesRequest, n_layers: int) -> list[int]:
    if request.layers and request.HasField("layer_range"):
        raise BadRequest("give layers or layer_range, not both")
    if request.HasField("layer_range"):
        return list(_range(request.layer_range, n_layers, "layer"))
    if len(request.layers) > n_layers:
        raise BadRequest(f"{len(request.layers)} layers asked for, the run has {n_layers}: name each layer once")
    chosen = list(request.layers) or list(range(n_layers))
    if len(set(chosen)) < len(chosen):
        raise BadRequest(f"layer {first_repeat(np.asarray(chosen))} is asked for more than once")
    unknown = [layer for layer in chosen if not 0 <= layer < n_layers]
    if unknown:
        raise NotFound(f"no layer {unknown[0]}: the run has layers 0..{n_layers - 1}")
    return chosen


def hidden(request: pb.ReadStatesRequest, size: int) -> slice:
    if not request.HasField("hidden_range"):
        return slice(0, size)
    r = _range(request.hidden_range, size, "hidden")
    return slice(r.start, r.stop)


def sample_ids(selection: pb.SampleSelection) -> np.ndarray | None:
    """The ids asked for, checked before any work that grows with them: at most MAX_SAMPLE_IDS, each once."""
    if not selection.ids:
        return None
    if selection.HasField("positions"):
        raise BadRequest("give sample ids or a position range, not both")
    if len(selection.ids) > MAX_SAMPLE_IDS:
        raise BadRequest(
            f"{len(selection.ids):,} sample ids in one request, above the limit of {MAX_SAMPLE_IDS:,}: "
            "split them over several requests"
        )
    wanted = np.fromiter(selection.ids, dtype=np.int64, count=len(selection.ids))
    repeat = first_repeat(wanted)
    if repeat is not None:
        raise BadRequest(f"sample id {repeat} is asked for more than once: name each sample once")
    return wanted


def first_repeat(values: np.ndarray) -> int | None:
    ordered = np.sort(values)
    repeats = ordered[1:][ordered[1:] == ordered[:-1]]
    return int(repeats[0]) if len(repeats) else None


def question_run(selection: pb.SampleSelection, site: str, run: Run) -> None:
    """Refuse, on a run of the study's questions, what only a capture run has: tokens, other sites."""
    if selection.token_positions or selection.HasField("token_range") or selection.rows:
        raise BadRequest(
            "token positions, token ranges and row indices select a capture run's rows: this run holds one row "
            "per question (select samples by id, position range or label)"
        )
    if site and site not in run.sites:
        raise SiteNotFound(run.key, site, list(run.sites))


def positions(
    selection: pb.SampleSelection, wanted: np.ndarray | None, labels: dict[str, np.ndarray], id_order: np.ndarray
) -> np.ndarray:
    """Positions along the run's sample axis, in the order asked for (ids) or stored (range, filters).

    ``wanted`` is ``sample_ids(selection)``; ``id_order`` the argsort of ``labels["sample"]`` (computed once
    per run snapshot).
    """
    ids = labels["sample"]
    n = len(ids)
    if wanted is not None:
        found = np.searchsorted(ids, wanted, sorter=id_order)
        found = np.minimum(found, n - 1) if n else found
        hits = id_order[found] if n else found
        missing = wanted[(ids[hits] != wanted)] if n else wanted
        if len(missing):
            raise NotFound(
                f"{len(missing)} sample id(s) not in this run's committed samples, e.g. {missing[:5].tolist()}"
            )
        chosen = hits
    elif selection.HasField("positions"):
        span = _range(selection.positions, n, "sample position")
        chosen = np.arange(span.start, span.stop)
    else:
        chosen = np.arange(n)
    keep = np.ones(len(chosen), dtype=bool)
    if len(selection.filters) > len(LABEL_NAMES):
        raise BadRequest(
            f"{len(selection.filters)} label filters, more than there are labels "
            f"({', '.join(LABEL_NAMES)}): give the values of a label in one filter"
        )
    for f in selection.filters:
        if f.name not in LABEL_NAMES:
            raise BadRequest(f"unknown label {echo(f.name)}; filter on {', '.join(LABEL_NAMES)}")
        if not f.values:
            raise BadRequest(f"label filter {f.name!r} has no values")
        keep &= np.isin(labels[f.name][chosen], _filter_values(f))
    chosen = chosen[keep]
    if len(chosen) == 0:
        raise BadRequest("the selection matches no sample")
    return chosen


def _filter_values(f: pb.LabelFilter) -> list:
    """The values to keep, typed like the label; ``correct`` takes true or false, anything else is refused
    (read as False, ``correct=maybe`` would silently select the wrong samples)."""
    if f.name != "correct":
        return list(f.values)
    bad = [v for v in f.values if v.lower() not in ("true", "false")]
    if bad:
        raise BadRequest(f"label filter 'correct' takes true or false, not {echo(bad[0])}")
    return [v.lower() == "true" for v in f.values]
