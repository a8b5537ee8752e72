"""Analysis jobs on the server: started, watched and cancelled over gRPC, run on Dask.

A job is one request: several runs x several layers, each (run, layer) one Dask task, plus one task
per compared pair of runs at each layer. Jobs live in memory, visible to the group that started them,
and are forgotten an hour after they end; their results live in the store (see analysis.layers), so a
job asked again, later or after a restart, finishes at once from the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path

from distributed import as_completed

from actstore.analysis.density import PAPER, DensityParams
from actstore.analysis.layers import Mask
from actstore.analysis.scheduler import ComparisonOutcome, LayerOutcome, RunName, dask_client, submit_layers
from actstore.server.selection import BadRequest
from actstore.store import echo
from actstore.v1 import actstore_pb2 as pb

log = logging.getLogger(__name__)

PRESETS = {"paper": PAPER}
KEEP_ENDED_S = 3600.0  # an ended job (and its results, kept in memory for watchers) is forgotten after this


class JobNotFound(LookupError):
    """NOT_FOUND."""


def params_from(request: pb.StartAnalysisRequest) -> DensityParams:
    """The preset with the request's overrides; raises BadRequest naming a bad value."""
    preset = request.preset or "paper"
    if preset not in PRESETS:
        raise BadRequest(f"unknown preset {echo(preset)}; known: {', '.join(PRESETS)}")
    overrides = {f.name: getattr(request.params, f.name) for f in dataclasses.fields(DensityParams)
                 if request.params.HasField(f.name)}
    params = dataclasses.replace(PRESETS[preset], **overrides)
    if params.maxk < 2 or params.density_k < 1 or params.density_k > params.maxk or params.z <= 0:
        raise BadRequest("need maxk >= 2, 1 <= density_k <= maxk and z > 0")
    if not 2 <= params.gride_range_max <= params.maxk or not 0 <= params.id_scale_index:
        raise BadRequest("need 2 <= gride_range_max <= maxk and id_scale_index >= 0")
    if params.id_scale_index >= params.gride_range_max.bit_length() - 1:
        raise BadRequest(f"id_scale_index {params.id_scale_index} is beyond the Gride scales up to "
                         f"{params.gride_range_max}")
    if not (0 < params.subject_fraction <= 1 and 0 < params.answer_fraction <= 1):
        raise BadRequest("class fractions must lie in (0, 1]")
    return params


class Job:
    def __init__(self, job_id: str, group: str | None, total: int) -> None:
        self.id = job_id
        self.group = group  # the caller's group: only it sees the job
        self.state = pb.JOB_STATE_QUEUED
        self.stage = "queued"
        self.total = total
        self.outcomes: list[LayerOutcome | ComparisonOutcome] = []  # in finishing order
        self.ended_at: float | None = None
        self.changed = threading.Condition()
        self.futures: list = []
        self.client = None

    def update(self, **values) -> bool:
        """Set attributes and wake watchers, unless the job has already ended (a cancel wins every race)."""
        with self.changed:
            if self.finished:
                return False
            for name, value in values.items():
                setattr(self, name, value)
            if self.finished:
                self.ended_at = time.monotonic()
            self.changed.notify_all()
            return True

    @property
    def finished(self) -> bool:
        return self.state in (pb.JOB_STATE_DONE, pb.JOB_STATE_CANCELLED)

    def to_proto(self, since: int = 0) -> pb.Job:
        """The job with the outcomes of tasks ``since`` onwards (in finishing order)."""
        with self.changed:
            return pb.Job(job_id=self.id, state=self.state, stage=self.stage, tasks_done=len(self.outcomes),
                          tasks_total=self.total, **outcome_messages(self.outcomes[since:]))


def outcome_messages(outcomes: list[LayerOutcome | ComparisonOutcome]) -> dict[str, list]:
    """The ``results`` and ``comparisons`` fields of a Job message holding these outcomes."""
    return {"results": [_result(o) for o in outcomes if isinstance(o, LayerOutcome)],
            "comparisons": [_comparison(o) for o in outcomes if isinstance(o, ComparisonOutcome)]}


def _comparison(o: ComparisonOutcome) -> pb.LayerComparison:
    out = pb.LayerComparison(runs=_pair(o.a, o.b), layer=o.layer, error=o.error or "")
    if o.result is not None:
        out.MergeFrom(pb.LayerComparison(n_common=o.result.n_common, data_overlap=o.result.data_overlap,
                                         ari_clusters=o.result.ari_clusters))
    return out


def _pair(a: RunName, b: RunName) -> pb.RunPair:
    return pb.RunPair(a=pb.RunRef(model=a[0], method=a[1]), b=pb.RunRef(model=b[0], method=b[1]))


def _result(o: LayerOutcome) -> pb.LayerResult:
    out = pb.LayerResult(run=pb.RunRef(model=o.model, method=o.method), layer=o.layer, error=o.error or "")
    if o.result is not None:
        r = o.result
        out.MergeFrom(pb.LayerResult(
            id=r.id, ids_gride=r.ids_gride.tolist(), id_2nn=r.id_2nn, n_clusters=r.n_clusters,
            core_fraction=r.core_fraction, ari_subject=r.ari_subject, ari_answer=r.ari_answer,
            ari_prediction=r.ari_prediction, overlap_subject=r.overlap_subject, overlap_answer=r.overlap_answer,
            sample_ids=o.sample_ids.tolist(), assignment=r.assignment.tolist()))
    if o.dendrogram is not None:
        d = o.dendrogram
        out.dendrogram.CopyFrom(pb.Dendrogram(clusters=d.clusters.tolist(), sizes=d.sizes.tolist(), labels=d.labels,
                                              linkage=d.linkage.ravel().tolist(),
                                              majority_share=d.majority_share.tolist()))
    return out


class JobManager:
    """Keeps the jobs of one server and the Dask client they run on (started on first use)."""

    def __init__(self, store: Path, scheduler: str | None = None, workers: int | None = None) -> None:
        self.store = store
        self._scheduler, self._workers = scheduler, workers
        self._client = None
        self._jobs: dict[str, Job] = {}
        self._by_request: dict[str, str] = {}
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                self._client = dask_client(self._scheduler, self._workers)
            return self._client

    def start(self, group: str | None, runs: list[RunName], layers: list[int], params: DensityParams, mask: Mask,
              pairs: list[tuple[RunName, RunName]], k: int, request_id: str) -> Job:
        with self._lock:
            self._forget_ended()
            request = (group, request_id)
            if request_id and request in self._by_request:
                return self._jobs[self._by_request[request]]
            n_runs = len(set(runs) | {run for pair in pairs for run in pair})
            job = Job(uuid.uuid4().hex[:16], group, (n_runs + len(pairs)) * len(layers))
            self._jobs[job.id] = job
            if request_id:
                self._by_request[request] = job.id
        threading.Thread(target=self._run, args=(job, runs, layers, params, mask, pairs, k), daemon=True,
                         name=f"job-{job.id}").start()
        return job

    def get(self, job_id: str, group: str | None) -> Job:
        job = self._jobs.get(job_id)
        if job is None or job.group != group:  # another group's job is as good as absent
            raise JobNotFound(f"no job {echo(job_id)} (jobs are kept in the server's memory for "
                              f"{KEEP_ENDED_S / 3600:g} h after they end, and until it restarts)")
        return job

    def _forget_ended(self) -> None:
        now = time.monotonic()
        ended = {job_id for job_id, job in self._jobs.items() if job.ended_at and now - job.ended_at > KEEP_ENDED_S}
        for job_id in ended:
            del self._jobs[job_id]
        self._by_request = {request: job_id for request, job_id in self._by_request.items() if job_id not in ended}

    def cancel(self, job: Job) -> None:
        if job.update(state=pb.JOB_STATE_CANCELLED, stage="cancelled") and job.client is not None:
            job.client.cancel(job.futures)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _run(self, job: Job, runs, layers, params, mask, pairs, k) -> None:
        job.update(stage="starting workers" if self._client is None else "submitting")
        try:
            client = self.client()
            futures = submit_layers(client, self.store, runs, layers, params, mask, pairs, k)
            if not job.update(client=client, futures=futures, state=pb.JOB_STATE_RUNNING, stage="running"):
                client.cancel(futures)  # cancelled while starting
                return
            for future in as_completed(futures):
                if job.finished:
                    return
                if not future.cancelled():
                    outcome = future.result()
                    job.update(outcomes=[*job.outcomes, outcome])
            job.update(state=pb.JOB_STATE_DONE, stage="done")
        except Exception as exc:  # noqa: BLE001 - the job reports it; the server goes on
            log.exception("job %s failed", job.id)
            job.update(state=pb.JOB_STATE_DONE, stage=f"failed: {type(exc).__name__}: {exc}")
