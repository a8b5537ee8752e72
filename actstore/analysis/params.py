"""The analysis parameters: the study's values, and how their neighbour counts shrink to fit a small run.

The study's values (``PAPER``) need more than 100 samples: each point's graph holds its 100 nearest
neighbours. A run of 100 samples or fewer (a first try, a per-subject mask) is analysed with every
neighbour count the caller did not set lowered to what its samples allow, so that it gives numbers
rather than an error; a run above 100 samples is analysed with exactly the values asked for. Light on
purpose (no numerical import): the command line shows these defaults in its help.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass

OVERLAP_K = 30  # neighbours of the data overlap between two runs (the study's)
MIN_SAMPLES = 10  # fewer leave nine neighbours or less: the ID at three Gride scales (2, 4, 8) at most


@dataclass(frozen=True)
class DensityParams:
    """Analysis parameters; ``PAPER`` holds the values of the study's figures."""

    maxk: int = 100
    gride_range_max: int = 100  # estimates at scales 2, 4, ..., 64
    id_scale_index: int = 3  # the scale-16 estimate is the ID used for the density
    density_k: int = 16
    z: float = 1.6
    subject_fraction: float = 0.3
    answer_fraction: float = 0.1


PAPER = DensityParams()


def fitted(params: DensityParams, given: Collection[str] = (), samples: int | None = None) -> DensityParams:
    """``params`` with each neighbour count not named in ``given`` lowered to what the others and runs of
    ``samples`` samples allow (None: no bound from the runs): maxk below the samples, the Gride range and
    the density's k at most maxk, the ID's scale among the Gride scales. Values at or under those bounds
    are kept, so that a run above ``params.maxk`` samples is analysed with ``params`` exactly."""

    def unless_given(name: str, bound: int) -> int:
        value = getattr(params, name)
        return value if name in given else min(value, bound)

    maxk = unless_given("maxk", samples - 1 if samples is not None else params.maxk)
    gride_range_max = unless_given("gride_range_max", maxk)
    return dataclasses.replace(
        params,
        maxk=maxk,
        gride_range_max=gride_range_max,
        density_k=unless_given("density_k", maxk),
        id_scale_index=unless_given("id_scale_index", max(gride_range_max.bit_length() - 2, 0)),
    )


def compare_k_for(samples: int) -> int:
    """The data overlap's neighbours for runs of ``samples`` samples: the study's 30, or fewer to fit."""
    return min(OVERLAP_K, samples - 1)
