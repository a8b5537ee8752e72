"""One analysis job: its state, the outcomes of its tasks as they finish, and the Job message a watcher
reads. Once it ends, its outcomes shrink to what finds them again in the store's cache."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
from distributed import Client, Future
from google.protobuf.timestamp_pb2 import Timestamp

from actstore.analysis import NotAnalysed
from actstore.analysis.scheduler import ComparisonOutcome, LayerOutcome, RunName, comparison_outcome, layer_outcome
from actstore.server.auth import Caller
from actstore.server.job_requests import Plan
from actstore.store import Store
from actstore.v1 import actstore_pb2 as pb
from actstore.wire.results import job_fields, run_pair, run_ref


@dataclasses.dataclass(frozen=True)
class Stored:
    """A task's outcome once its job ended: only what finds it again in the store's cache, so that a kept
    job holds no arrays (a layer's result carries a cluster and a sample id per sample)."""

    names: tuple[RunName, ...]  # the run analysed, or the two compared
    layer: int

    @classmethod
    def of(cls, outcome: LayerOutcome | ComparisonOutcome) -> Stored:
        if isinstance(outcome, LayerOutcome):
            return cls(((outcome.model, outcome.method),), outcome.layer)
        return cls((outcome.a, outcome.b), outcome.layer)

    def load(self, store: Store, plan: Plan) -> LayerOutcome | ComparisonOutcome:
        """The outcome again, from the cache (an error outcome saying so when the run has grown since)."""
        args = plan.params, plan.mask
        try:
            if len(self.names) == 1:
                return layer_outcome(store, *self.names[0], self.layer, *args, compute=False)
            a, b = (LayerOutcome(*name, self.layer, None, None, None) for name in self.names)
            return comparison_outcome(store, a, b, *args, plan.k, compute=False)
        except NotAnalysed:
            error = "no longer in the store's cache (the run has grown since the job); start the job again"
            if len(self.names) == 1:
                return LayerOutcome(*self.names[0], self.layer, None, None, error)
            return ComparisonOutcome(*self.names, self.layer, None, error)


class Job:
    def __init__(
        self,
        job_id: str,
        caller: Caller,
        total: int,
        cache: tuple[str, Plan] | None = None,
        settings: pb.AnalysisSettings | None = None,
    ) -> None:
        """``caller``: who started it (its group sees it, its owner cancels it). ``cache``: the store and plan
        its results are cached with, which an ended job reads them back from. ``settings``: what its
        analyses run with, told to every watcher."""
        self.id = job_id
        self.caller = caller
        self.settings = settings
        self.created = Timestamp()
        self.created.GetCurrentTime()
        self.state = pb.JOB_STATE_QUEUED
        self.stage = "queued"
        self.failure: grpc.StatusCode | None = None  # why a FAILED job failed, as a status code
        self.total = total
        self.cache = cache
        self.outcomes: list[LayerOutcome | ComparisonOutcome | Stored] = []  # in finishing order
        self.ended_at: float | None = None
        self.changed = threading.Condition()
        self.futures: list[Future] = []  # while it runs
        self.client: Client | None = None

    def update(self, **values) -> bool:
        """Set attributes and wake watchers, unless the job has already ended (a cancel wins every race)."""
        with self.changed:
            if self.finished:
                return False
            for name, value in values.items():
                setattr(self, name, value)
            if self.finished:
                self.ended_at = time.monotonic()
                if self.cache is not None:  # from now on its results are read back from the store
                    self.outcomes = [o if o.error else Stored.of(o) for o in self.outcomes]
            self.changed.notify_all()
            return True

    def add(self, outcome: LayerOutcome | ComparisonOutcome) -> None:
        """One more task's outcome; the last one makes the job DONE."""
        with self.changed:
            outcomes = [*self.outcomes, outcome]
            if len(outcomes) < self.total:
                self.update(outcomes=outcomes)
            else:
                self.update(outcomes=outcomes, state=pb.JOB_STATE_DONE, stage="done", futures=[], client=None)

    def end(self, state: int, stage: str, failure: grpc.StatusCode | None = None) -> None:
        """End it (FAILED with the ``failure`` code, or CANCELLED) and cancel the tasks it still has on Dask."""
        with self.changed:
            futures, client = self.futures, self.client
            ended = self.update(state=state, stage=stage, failure=failure, futures=[], client=None)
        if ended and client is not None:
            client.cancel(futures)

    @property
    def finished(self) -> bool:
        return self.state in (pb.JOB_STATE_DONE, pb.JOB_STATE_CANCELLED, pb.JOB_STATE_FAILED)

    def to_proto(self, since: int | None = 0) -> pb.Job:
        """The job with the outcomes of tasks ``since`` onwards (in finishing order; None: none, as a list
        of jobs shows them)."""
        plan = self.cache[1] if self.cache is not None else None
        with self.changed:
            outcomes = [self._loaded(o) for o in self.outcomes[since:]] if since is not None else []
            return pb.Job(
                job_id=self.id,
                state=self.state,
                stage=self.stage,
                tasks_done=len(self.outcomes),
                tasks_total=self.total,
                failure_code=self.failure.value[0] if self.failure else 0,
                settings=self.settings,
                created=self.created,
                runs=[run_ref(run) for run in plan.runs] if plan else [],
                compare=[run_pair(*pair) for pair in plan.pairs] if plan else [],
                **job_fields(
                    [o for o in outcomes if isinstance(o, LayerOutcome)],
                    [o for o in outcomes if isinstance(o, ComparisonOutcome)],
                ),
            )

    def _loaded(self, outcome: LayerOutcome | ComparisonOutcome | Stored) -> LayerOutcome | ComparisonOutcome:
        if not isinstance(outcome, Stored):
            return outcome
        store, plan = self.cache
        return outcome.load(Store(store), plan)
