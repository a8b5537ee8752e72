"""A capture run's side of a ReadStates / ReadLabels request: which site, which rows, and the rows' coordinates
as ``Column`` messages.

A capture run (actstore.store.capture) has one growing axis of rows, its texts (``sample``) or their tokens
(``token``), a text's rows contiguous; each row carries its text's id (``sample``), its ``position`` in the
text (-1 for a mean over the text), its ``token_id`` and the run's label columns. Rows are chosen by the
texts' ids (every row of each, in the order asked) or a range of rows, then narrowed by token positions and
label filters. Every failure names what was asked and what the run holds (INVALID_ARGUMENT, or NOT_FOUND for
an id the run lacks, as for a question run).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from actstore.server.selection import BadRequest, NotFound, first_repeat
from actstore.store import Run, SiteNotFound, echo
from actstore.store.capture import ROW_COORDS
from actstore.v1 import actstore_pb2 as pb
from actstore.wire.columns import encode_column

MAX_TOKEN_POSITIONS = 10_000  # per request: more positions than any text has tokens
MAX_LISTED_VALUES = 1000  # distinct values of a label column that DescribeRun lists
COLUMN_FRAMING = 8  # bytes of a Column beyond its values: tags, lengths, name and dtype (names are short)


def site_of(run: Run, name: str) -> str:
    """The site asked for (empty: the run's first); INVALID_ARGUMENT naming the run's sites otherwise."""
    if not name:
        return run.default_site
    if name not in run.sites:
        raise SiteNotFound(run.key, name, list(run.sites))
    return name


def column_dtypes(run: Run) -> dict[str, str]:
    """Each row coordinate of a capture run with its dtype: sample, position, token_id, then the labels."""
    return {**ROW_COORDS, **run.capture.labels}


def rows(selection: pb.SampleSelection, wanted: np.ndarray | None, run: Run) -> np.ndarray:
    """The rows a selection takes, in the order asked (ids) or stored (range, everything), narrowed by token
    positions and label filters. ``wanted`` is ``selection.sample_ids(selection)``."""
    labels, n = run.labels(), run.n_samples
    ways = [
        wanted is not None,
        selection.HasField("positions"),
        selection.HasField("token_range"),
        bool(selection.rows),
    ]
    if sum(ways) > 1:
        raise BadRequest("give sample ids, a sample position range, a row range (token_range) or rows: one of them")
    if selection.HasField("positions") and run.row_dim == "token":
        raise BadRequest(
            f"run {run.key} holds a row per token: give a range of its rows as token_range (the client's "
            "tokens=START:STOP, `actstore query get --tokens START:STOP`), not a sample position range"
        )
    if wanted is not None:
        chosen = _rows_of_texts(labels["sample"], run.sample_order, wanted)
    elif selection.rows:
        chosen = _indexed_rows(selection.rows, run)
    elif selection.HasField("token_range") or selection.HasField("positions"):
        tokens = selection.HasField("token_range")
        r = selection.token_range if tokens else selection.positions
        if r.start < 0 or r.stop > n or r.start >= r.stop:
            raise BadRequest(
                f"{'token' if tokens else 'sample position'} range {r.start}:{r.stop} is empty or outside the "
                f"{n} rows of run {run.key} (0:{n}, one per {run.row_dim})"
            )
        chosen = np.arange(r.start, r.stop)
    else:
        chosen = np.arange(n)
    keep = np.ones(len(chosen), dtype=bool)
    if selection.token_positions:
        keep &= _at_positions(run, np.asarray(selection.token_positions, dtype=np.int64))[chosen]
    dtypes = column_dtypes(run)
    if len(selection.filters) > len(dtypes):
        raise BadRequest(
            f"{len(selection.filters)} label filters, more than the run has columns ({', '.join(dtypes)}): "
            "give the values of a column in one filter"
        )
    for f in selection.filters:
        if f.name not in dtypes:
            raise BadRequest(f"unknown label {echo(f.name)}; filter on {', '.join(dtypes)}")
        if not f.values:
            raise BadRequest(f"label filter {f.name!r} has no values")
        keep &= _matches(labels[f.name][chosen], dtypes[f.name], f)
    chosen = chosen[keep]
    if len(chosen) == 0:
        raise BadRequest("the selection matches no row")
    return chosen


def _rows_of_texts(ids: np.ndarray, order: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Every row of each text in ``wanted``, text after text in the order asked, a text's rows as stored
    (``order`` is the stable argsort of ``ids``, so each text's rows stay in their order)."""
    ordered = ids[order]
    left = np.searchsorted(ordered, wanted, side="left")
    right = np.searchsorted(ordered, wanted, side="right")
    missing = wanted[left == right]
    if len(missing):
        raise NotFound(f"{len(missing)} sample id(s) not in this run's committed samples, e.g. {missing[:5].tolist()}")
    counts = right - left
    firsts = np.repeat(left - (np.cumsum(counts) - counts), counts)  # each row's offset into ``ordered``
    return order[firsts + np.arange(int(counts.sum()))]


def _at_positions(run: Run, asked: np.ndarray) -> np.ndarray:
    """A mask over the run's rows: those at one of the ``asked`` positions in their text, negative ones
    counted from the text's end. Refused: a run of means, a negative position where the run does not hold
    each text's last token (its length is then unknown), and a position no row of the run is at."""
    if len(asked) > MAX_TOKEN_POSITIONS:
        raise BadRequest(f"{len(asked):,} token positions in one request, above the limit of {MAX_TOKEN_POSITIONS:,}")
    repeat = first_repeat(asked)
    if repeat is not None:
        raise BadRequest(f"token position {repeat} is asked for more than once: name each position once")
    labels = run.labels()
    sample, position = labels["sample"], labels["position"]
    held = _positions_recipe(run)
    if len(position) and (position == -1).any():
        raise BadRequest(
            f"run {run.key} holds each text's mean over its tokens (positions {held!r}), not single tokens: "
            "it takes no token positions"
        )
    ahead, behind = asked[asked >= 0], asked[asked < 0]
    mask = np.isin(position, ahead)
    found = set(np.unique(position[mask]).tolist())
    if len(behind):
        if not _holds_last_token(held):
            raise BadRequest(
                f"run {run.key} does not hold each text's last token (positions {held!r}), so a text's length "
                "is unknown: give token positions from the start (0 and up)"
            )
        from_end = position - _text_lengths(sample, position)
        at_end = np.isin(from_end, behind)
        found |= set(np.unique(from_end[at_end]).tolist())
        mask |= at_end
    missing = [int(p) for p in asked if int(p) not in found]
    if missing:
        longest = int(position.max()) + 1 if len(position) else 0
        raise BadRequest(
            f"no row of run {run.key} is at token position {missing[0]}: it holds positions {held!r} of its "
            f"texts, the longest of {longest} tokens"
        )
    return mask


def _positions_recipe(run: Run) -> str:
    """The positions the run was captured at, as ``actstore ingest --positions`` took them ("all", "last"...)."""
    recipe = run.attrs.get("recipe") or {}
    return str(recipe.get("positions", "unknown"))


def _holds_last_token(held: str) -> bool:
    """Whether each text's last token has a row, so that a text's length is its largest position + 1."""
    if held.strip() in ("all", "last"):
        return True
    try:
        return -1 in {int(part) for part in held.split(",")}
    except ValueError:
        return False


def _text_lengths(sample: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Each row's text length in tokens, from the text's rows (contiguous): its largest position + 1."""
    if not len(sample):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sample[1:] != sample[:-1]])
    longest = np.maximum.reduceat(position, starts) + 1
    return np.repeat(longest, np.diff(np.r_[starts, len(sample)]))


def _matches(values: np.ndarray, dtype: str, f: pb.LabelFilter) -> np.ndarray:
    """The rows whose value, as text, is one of the filter's; a bool column takes true or false (read as
    False, ``flag=maybe`` would silently select the wrong rows)."""
    if dtype == "bool":
        bad = [v for v in f.values if v.lower() not in ("true", "false")]
        if bad:
            raise BadRequest(f"label filter {f.name!r} takes true or false, not {echo(bad[0])}")
        return np.isin(values.astype(bool), [v.lower() == "true" for v in f.values])
    distinct = np.unique(values)
    wanted = set(f.values)
    hits = distinct[np.fromiter((str(v) in wanted for v in distinct), dtype=bool, count=len(distinct))]
    return np.isin(values, hits)


def columns(run: Run, chosen: np.ndarray) -> list[pb.Column]:
    """The coordinates of the ``chosen`` rows, one Column each, in ``column_dtypes`` order."""
    labels = run.labels()
    return [encode_column(name, dtype, labels[name][chosen]) for name, dtype in column_dtypes(run).items()]


def _indexed_rows(rows: Sequence[int], run: Run) -> np.ndarray:
    """``rows`` as an array, every one among the run's committed rows."""
    chosen = np.asarray(rows, dtype=np.int64)
    outside = chosen[(chosen < 0) | (chosen >= run.n_samples)]
    if outside.size:
        raise BadRequest(
            f"{outside.size} row(s) outside the {run.n_samples} rows of run {run.key} (0..{run.n_samples - 1}), "
            f"e.g. {int(outside[0])}"
        )
    return chosen


def min_row_bytes(run: Run) -> int:
    """The least a row's coordinates take on the wire (a byte a value): sizes a selection in O(1)."""
    return len(column_dtypes(run))


def columns_bytes(run: Run, chosen: np.ndarray) -> int:
    """The size of ``columns(run, chosen)`` on the wire, within a few bytes a column, without building it."""
    labels = run.labels()
    total = 0
    for name, dtype in column_dtypes(run).items():
        values = labels[name][chosen]
        if dtype == "int64":
            total += _varint_bytes(values)
        elif dtype == "float64":
            total += 8 * len(values)
        elif dtype == "bool":
            total += len(values)
        else:
            total += sum(map(len, values)) + 2 * len(values)  # characters, a tag and a length each
        total += COLUMN_FRAMING + len(name)
    return total


def _varint_bytes(values: np.ndarray) -> int:
    """Bytes of ``values`` as packed sint64 (zigzag varints)."""
    v = values.astype(np.int64)
    zigzag = ((v << 1) ^ (v >> 63)).view(np.uint64)
    return int(len(v) + sum(int((zigzag >= np.uint64(1 << (7 * k))).sum()) for k in range(1, 10)))


def label_values(run: Run) -> list[pb.LabelValues]:
    """A capture run's label columns, each with its distinct values sorted as text (at most MAX_LISTED_VALUES)."""
    labels = run.labels()
    listed = []
    for name in run.capture.labels:
        values = sorted({str(v) for v in np.unique(labels[name])})
        listed.append(
            pb.LabelValues(name=name, values=values[:MAX_LISTED_VALUES], truncated=len(values) > MAX_LISTED_VALUES)
        )
    return listed
