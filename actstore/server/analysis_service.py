"""AnalysisService: start, watch, cancel and list density analyses of the runs a caller may read.

A job is seen by its group (under open access by everyone) and cancelled only by its owner: the group,
or under open access the caller that started it, known by its host and bearer token (auth.client_key).
A caller's list holds the jobs it owns, never another's.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import grpc

from actstore.analysis.layers import Mask
from actstore.analysis.params import compare_k_for
from actstore.analysis.tokens import Reduction
from actstore.server import selection
from actstore.server.auth import Caller
from actstore.server.job import Job
from actstore.server.job_requests import fewest_samples, params_from
from actstore.server.jobs import JobManager
from actstore.server.rpc import Servicer, rpc
from actstore.store import LabelNotFound, Run, SiteNotFound
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc

WATCH_POLL_S = 0.2  # how often a watcher looks at its job: waiting costs no thread, only this poll


def identified(handler: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """An ``rpc`` handler given its caller with the client key that open access needs to tell owners apart
    (the peer and metadata are on the call's context, which ``rpc`` does not pass on)."""

    @functools.wraps(handler)
    async def call(self, request, context: grpc.aio.ServicerContext, caller: Caller):
        return await handler(self, request, context, caller.identified(context.peer(), context.invocation_metadata()))

    return call


class AnalysisService(Servicer, pb_grpc.AnalysisServiceServicer):
    def __init__(self, *args, jobs: JobManager, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.jobs = jobs

    @identified
    @rpc
    def StartAnalysis(self, request: pb.StartAnalysisRequest, caller: Caller) -> pb.Job:
        if not request.runs and not request.compare:
            raise selection.BadRequest("name at least one run or pair of runs to compare")
        runs = [self.readable_run(ref, caller) for ref in request.runs]
        pairs = [(self.readable_run(pair.a, caller), self.readable_run(pair.b, caller)) for pair in request.compare]
        if any((a.model, a.method) == (b.model, b.method) for a, b in pairs):
            raise selection.BadRequest("a run compared with itself")
        if request.HasField("compare_k") and request.compare_k < 1:
            raise selection.BadRequest("compare_k must be at least 1")
        every_run = [*runs, *(run for pair in pairs for run in pair)]
        n_layers = min(run.shape[0] for run in every_run)
        layers = list(request.layers) or list(range(1, n_layers))
        unknown = [layer for layer in layers if not 0 <= layer < n_layers]
        if unknown:
            raise selection.NotFound(f"no layer {unknown[0]}: the runs have layers 0..{n_layers - 1}")
        if request.HasField("per_subject") and request.per_subject < 1:
            raise selection.BadRequest("per_subject must be at least 1")
        mask = _mask(request, runs, pairs)
        _, samples = fewest_samples(every_run, mask)
        params = params_from(request, samples)
        k = request.compare_k if request.HasField("compare_k") else compare_k_for(samples)
        job = self.jobs.start(
            caller,
            [(r.model, r.method) for r in runs],
            layers,
            params,
            mask,
            [((a.model, a.method), (b.model, b.method)) for a, b in pairs],
            k,
            request.request_id,
        )
        return job.to_proto()

    @rpc
    def GetJob(self, request: pb.JobRef, caller: Caller) -> pb.Job:
        return self.jobs.get(request.job_id, caller).to_proto()

    @identified
    @rpc
    def CancelJob(self, request: pb.JobRef, caller: Caller) -> pb.Job:
        """NOT_FOUND for a job the caller's group does not see; PERMISSION_DENIED for one it sees but did
        not start (under open access, another caller's)."""
        return self.jobs.cancel(request.job_id, caller).to_proto()

    @identified
    @rpc
    def ListJobs(self, request: pb.ListJobsRequest, caller: Caller) -> pb.ListJobsResponse:
        """The caller's own jobs (see ``JobManager.owned``), without their results."""
        return pb.ListJobsResponse(jobs=[job.to_proto(since=None) for job in self.jobs.owned(caller)])

    @rpc
    async def WatchJob(self, request: pb.JobRef, context: grpc.aio.ServicerContext, caller: Caller) -> None:
        """Each event carries the tasks finished since the previous one (the first: all so far).

        The watcher polls its job on the event loop rather than blocking a thread on ``job.changed``:
        a thousand idle watchers cost a thousand cheap checks every WATCH_POLL_S, not a thousand threads.
        """
        job: Job = await self.offload(self.jobs.get, request.job_id, caller)  # may wait on the manager's lock
        seen, sent = None, 0
        while True:
            if _progress(job) == seen:
                await asyncio.sleep(WATCH_POLL_S)
                continue
            seen, snapshot, ended = await self.offload(_snapshot, job, sent)
            sent = seen[2]
            await context.write(snapshot)
            if ended:
                return


def _mask(request: pb.StartAnalysisRequest, runs: list[Run], pairs: list[tuple[Run, Run]]) -> Mask:
    """The points analysed: the per-subject mask of question runs, or the cloud of capture runs (site,
    reduction, label), each checked against the runs it applies to (BadRequest, one line)."""
    per_subject = request.per_subject if request.HasField("per_subject") else None
    captures = [run for run in runs if run.capture is not None]
    cloud = request.site or request.reduction or request.label
    if not captures:
        if cloud:
            raise selection.BadRequest("site, reduction and label take capture runs; these are question runs")
        return Mask(per_subject)
    if len(captures) != len(runs) or pairs or per_subject is not None:
        raise selection.BadRequest(
            "capture runs are analysed on their own: not beside question runs, compared, or with per_subject"
        )
    try:
        Reduction.parse(request.reduction or "last")
    except ValueError as exc:
        raise selection.BadRequest(str(exc)) from None
    for run in captures:
        if request.site and request.site not in run.sites:
            raise SiteNotFound(run.key, request.site, list(run.sites))
        if request.label and request.label not in run.labels():
            raise LabelNotFound(run.key, request.label, list(run.labels()))
    mask = Mask(site=request.site or None, reduction=request.reduction or "last", label=request.label or None)
    for run in captures:
        try:
            mask.positions(run)  # a position beyond a text, more tokens than stored
        except ValueError as exc:
            raise selection.BadRequest(str(exc)) from None
    return mask


def _progress(job: Job) -> tuple:
    return job.state, job.stage, len(job.outcomes)


def _snapshot(job: Job, since: int) -> tuple[tuple, pb.Job, bool]:
    """Progress, message and end test under one lock: the last message sent is the final state."""
    with job.changed:
        return _progress(job), job.to_proto(since=since), job.finished
