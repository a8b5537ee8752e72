"""What an analysis request asks for, checked before anything is queued: its parameters (a preset and the
request's overrides) and its plan (every task once), with neighbour counts the runs can meet."""

from __future__ import annotations

import dataclasses
import math

from actstore.analysis.density import PAPER, DensityParams
from actstore.analysis.layers import Mask
from actstore.analysis.scheduler import RunName
from actstore.server.selection import BadRequest
from actstore.store import Store, echo
from actstore.v1 import actstore_pb2 as pb

PRESETS = {"paper": PAPER}
MAX_K = 4096  # the most neighbours any analysis may ask for: its graph holds samples x k of them


def params_from(request: pb.StartAnalysisRequest) -> DensityParams:
    """The preset with the request's overrides; raises BadRequest naming a bad value."""
    preset = request.preset or "paper"
    if preset not in PRESETS:
        raise BadRequest(f"unknown preset {echo(preset)}; known: {', '.join(PRESETS)}")
    overrides = {f.name: getattr(request.params, f.name) for f in dataclasses.fields(DensityParams)
                 if request.params.HasField(f.name)}
    params = dataclasses.replace(PRESETS[preset], **overrides)
    if not 2 <= params.maxk <= MAX_K or not 1 <= params.density_k <= params.maxk:
        raise BadRequest(f"need 2 <= maxk <= {MAX_K} and 1 <= density_k <= maxk")
    if not (math.isfinite(params.z) and params.z > 0):  # NaN passes a plain z <= 0 test
        raise BadRequest(f"z must be a finite number above 0, not {params.z}")
    if not 2 <= params.gride_range_max <= params.maxk or not 0 <= params.id_scale_index:
        raise BadRequest("need 2 <= gride_range_max <= maxk and id_scale_index >= 0")
    if params.id_scale_index >= params.gride_range_max.bit_length() - 1:
        raise BadRequest(f"id_scale_index {params.id_scale_index} is beyond the Gride scales up to "
                         f"{params.gride_range_max}")
    if not (0 < params.subject_fraction <= 1 and 0 < params.answer_fraction <= 1):  # NaN fails both
        raise BadRequest("class fractions must lie in (0, 1]")
    return params


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
    def of(cls, runs: list[RunName], layers: list[int], pairs: list[tuple[RunName, RunName]],
           params: DensityParams, mask: Mask, k: int) -> Plan:
        """The request's plan with repeated runs, layers and pairs merged (first occurrence's order)."""
        return cls(tuple(dict.fromkeys(runs)), tuple(dict.fromkeys(layers)), tuple(dict.fromkeys(pairs)), params,
                   mask, k)

    @property
    def every_run(self) -> tuple[RunName, ...]:
        return tuple(dict.fromkeys([*self.runs, *(run for pair in self.pairs for run in pair)]))

    @property
    def total(self) -> int:
        return (len(self.every_run) + len(self.pairs)) * len(self.layers)

    def check_size(self, store: Store) -> None:
        """BadRequest when a neighbour count cannot be met: analyses need more samples than maxk, the
        data overlap more than compare_k (known up front: no run has more samples than it holds)."""
        if not 1 <= self.k <= MAX_K:
            raise BadRequest(f"compare_k must lie in 1..{MAX_K}")
        runs = {run: store.run(*run).n_samples for run in self.every_run}
        run, fewest = min(runs.items(), key=lambda item: item[1])
        for name, k in (("maxk", self.params.maxk), ("compare_k", self.k if self.pairs else 0)):
            if k >= fewest:
                raise BadRequest(f"{name}={k} needs more than {k} samples; {run[0]}/{run[1]} holds {fewest}")
