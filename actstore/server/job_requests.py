"""What an analysis request asks for, checked before anything is queued: its parameters (a preset and the
request's overrides) and its plan (every task once), with neighbour counts the runs can meet."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable

from actstore.analysis.layers import Mask
from actstore.analysis.params import MIN_SAMPLES, PAPER, DensityParams, fitted
from actstore.analysis.scheduler import RunName
from actstore.server.errors import TooSmall
from actstore.server.selection import BadRequest
from actstore.store import Run, Store, echo
from actstore.v1 import actstore_pb2 as pb
from actstore.wire.results import settings_message

log = logging.getLogger(__name__)

PRESETS = {"paper": PAPER}
MAX_K = 4096  # the most neighbours any analysis may ask for: its graph holds samples x k of them


def params_from(request: pb.StartAnalysisRequest, samples: int | None = None) -> DensityParams:
    """The preset with the request's overrides, each neighbour count the request leaves unset fitted to the
    others and to runs of ``samples`` samples (``analysis.params.fitted``; None: not to any run); raises
    BadRequest naming a bad value."""
    preset = request.preset or "paper"
    if preset not in PRESETS:
        raise BadRequest(f"unknown preset {echo(preset)}; known: {', '.join(PRESETS)}")
    overrides = {
        f.name: getattr(request.params, f.name)
        for f in dataclasses.fields(DensityParams)
        if request.params.HasField(f.name)
    }
    asked = dataclasses.replace(PRESETS[preset], **overrides)
    params = fitted(asked, overrides, samples)
    lowered = (
        ""
        if params.maxk == asked.maxk
        else f" (maxk lowered to {params.maxk} to fit a run of {samples} samples; set maxk to choose it)"
    )
    if not 2 <= params.maxk <= MAX_K or not 1 <= params.density_k <= params.maxk:
        raise BadRequest(
            f"need 2 <= maxk <= {MAX_K} and 1 <= density_k <= maxk, not maxk={params.maxk} and "
            f"density_k={params.density_k}{lowered}"
        )
    if not (math.isfinite(params.z) and params.z > 0):  # NaN passes a plain z <= 0 test
        raise BadRequest(f"z must be a finite number above 0, not {params.z}")
    if not 2 <= params.gride_range_max <= params.maxk or not 0 <= params.id_scale_index:
        raise BadRequest(
            f"need 2 <= gride_range_max <= maxk and id_scale_index >= 0, not gride_range_max="
            f"{params.gride_range_max}, maxk={params.maxk} and id_scale_index={params.id_scale_index}"
            f"{lowered}"
        )
    if params.id_scale_index >= params.gride_range_max.bit_length() - 1:
        raise BadRequest(
            f"id_scale_index {params.id_scale_index} is beyond the Gride scales up to {params.gride_range_max}{lowered}"
        )
    if not (0 < params.subject_fraction <= 1 and 0 < params.answer_fraction <= 1):  # NaN fails both
        raise BadRequest("class fractions must lie in (0, 1]")
    if params != asked:
        log.info(
            "analysis settings fitted to the request%s: %s",
            f" and a run of {samples} samples" if samples is not None else "",
            params,
        )
    return params


def fewest_samples(runs: Iterable[Run], mask: Mask) -> tuple[Run, int]:
    """The run whose analyses see the fewest samples (after the mask), and how many; TooSmall
    (FAILED_PRECONDITION) when that is below MIN_SAMPLES: no setting gives a meaningful analysis then."""
    run, fewest = min(((run, len(mask.positions(run))) for run in runs), key=lambda item: item[1])
    if fewest < MIN_SAMPLES:
        masked = f" (the first {mask.per_subject} of each subject)" if mask.per_subject is not None else ""
        raise TooSmall(
            f"{run.model}/{run.method} holds {fewest} samples{masked}; the analyses need at least "
            f"{MIN_SAMPLES}: ingest more questions into it"
        )
    return run, fewest


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a job computes, each task once: every run (named, or in a pair) at every layer, and every
    pair at every layer."""

    runs: tuple[RunName, ...]
    layers: tuple[int, ...]
    pairs: tuple[tuple[RunName, RunName], ...]
    params: DensityParams
    mask: Mask
    k: int

    @classmethod
    def of(
        cls,
        runs: list[RunName],
        layers: list[int],
        pairs: list[tuple[RunName, RunName]],
        params: DensityParams,
        mask: Mask,
        k: int,
    ) -> Plan:
        """The request's plan with repeated runs, layers and pairs merged (first occurrence's order)."""
        return cls(
            tuple(dict.fromkeys(runs)), tuple(dict.fromkeys(layers)), tuple(dict.fromkeys(pairs)), params, mask, k
        )

    @property
    def every_run(self) -> tuple[RunName, ...]:
        return tuple(dict.fromkeys([*self.runs, *(run for pair in self.pairs for run in pair)]))

    def settings(self, smallest_run_samples: int) -> pb.AnalysisSettings:
        """What its analyses run with, for its Job messages (see ``check_size`` for the samples)."""
        return settings_message(dataclasses.asdict(self.params), self.k, self.mask.per_subject, smallest_run_samples)

    @property
    def total(self) -> int:
        return (len(self.every_run) + len(self.pairs)) * len(self.layers)

    def check_size(self, store: Store) -> int:
        """The samples the job's smallest run holds (after the mask); TooSmall below the minimum, BadRequest
        when a neighbour count cannot be met: analyses need more samples than maxk, the data overlap more
        than compare_k (known up front: no run has more samples than it holds)."""
        if not 1 <= self.k <= MAX_K:
            raise BadRequest(f"compare_k must lie in 1..{MAX_K}")
        run, fewest = fewest_samples((store.run(*name) for name in self.every_run), self.mask)
        for name, k in (("maxk", self.params.maxk), ("compare_k", self.k if self.pairs else 0)):
            if k >= fewest:
                raise BadRequest(f"{name}={k} needs more than {k} samples; {run.model}/{run.method} holds {fewest}")
        return fewest
