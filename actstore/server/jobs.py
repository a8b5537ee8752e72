"""Analysis jobs on the server: started, watched and cancelled over gRPC, run on Dask.

A job is one request: several runs x several layers, each (run, layer) one Dask task, plus one task
per compared pair of runs at each layer (duplicates in the request are merged, so progress counts
distinct tasks). Jobs live in memory, visible to the group that started them (under open access, to
everyone) and cancelled only by their owner: the group, or under open access the caller that started
them (``Caller.owner``; another caller's cancel is PERMISSION_DENIED). Each owner may run a bounded
number at once and is remembered a bounded number after they end (the oldest ended first forgotten, and
all an hour after they end). Their results live in the store (see analysis.layers), so a job asked
again, later or after a restart, finishes at once from the cache.

Owners share the workers in turn, not first come first served: every job's tasks get Dask priorities
from ``FairShares``, so one owner's full quota of long jobs delays another owner's one-layer job by at
most about one running task, not by the whole queue.

Replicas (several servers on one store, a folder or a bucket): a job lives in the memory of the replica
that started it. Its id asked of another replica (GetJob, WatchJob, CancelJob) is NOT_FOUND, with a
message saying so; ask the replica that started it (a client given several addresses balances each call
separately, so one that watches a job should talk to one replica). Its results, though, are in the store:
the same analysis started on any replica is answered from there, each task reading its cached result
instead of computing it again.

Tasks carry the store's URL and run names, never arrays: each Dask worker opens the store itself (a
bucket through its own S3 client, configured by the worker's environment), so a cluster needs no shared
filesystem.

A job ends DONE only when every one of its tasks finished; FAILED with the reason when one could not
(its workers killed past Dask's allowed failures, corrupt stored bytes, the scheduler lost or
unreachable); CANCELLED when asked. Two threads serve every job, however many there are: one dispatcher
that submits them (connecting to the scheduler, or starting the local cluster, on first use and again
after it was lost) and keeps the local cluster at its size, and Dask's callback thread, on which each
task's outcome arrives.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import CancelledError

import grpc
from distributed import Client, Future
from distributed.scheduler import KilledWorker

from actstore.analysis.density import DensityParams
from actstore.analysis.layers import Mask
from actstore.analysis.scheduler import FairShares, RunName, dask_client, restore_workers, submit_layers
from actstore.server.auth import Caller
from actstore.server.errors import Forbidden, TooLarge, status_of
from actstore.server.job import Job
from actstore.server.job_requests import Plan, params_from  # noqa: F401 - params_from: where callers look it up
from actstore.store import Store, echo
from actstore.v1 import actstore_pb2 as pb

log = logging.getLogger(__name__)

KEEP_ENDED_S = 3600.0  # an ended job (and its results, kept in memory for watchers) is forgotten after this
MAX_RUNNING = 4  # jobs an owner (a group, or an open caller) may have queued or running at once
MAX_KEPT = 32  # ended jobs remembered per owner
CHECK_S = 1.0  # how often the dispatcher looks at the local cluster's workers


class JobNotFound(LookupError):
    """NOT_FOUND."""


class JobManager:
    """Keeps the jobs of one server and the Dask client they run on (connected on first use, and again
    when the scheduler was lost), with a quota of running and of remembered jobs per owner, and the
    owners' fair shares of the workers."""

    def __init__(
        self,
        store: str,
        scheduler: str | None = None,
        workers: int | None = None,
        *,
        max_running: int = MAX_RUNNING,
        max_kept: int = MAX_KEPT,
        keep_ended_s: float = KEEP_ENDED_S,
    ) -> None:
        self.store = store
        self._scheduler, self._workers = scheduler, workers
        self.max_running, self.max_kept, self.keep_ended_s = max_running, max_kept, keep_ended_s
        self._client: Client | None = None
        self._shares = FairShares()  # of the current client's cluster: a new client starts afresh
        self._jobs: dict[str, Job] = {}
        self._by_request: dict[tuple[str, str], str] = {}  # (owner, request id) -> job id
        self._lock = threading.Lock()  # the jobs; never held while connecting, so that start() answers at once
        self._connecting = threading.Lock()  # the client
        self._queue: queue.Queue[tuple[Job, Plan] | None] = queue.Queue()
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True, name="jobs")
        self._dispatcher.start()

    @property
    def _where(self) -> str:
        return f"the Dask scheduler at {self._scheduler}" if self._scheduler else "the local Dask cluster"

    def client(self) -> Client:
        """The client, a new one when there is none or the last lost its scheduler (it reconnects by
        itself for a while, then closes; jobs cannot wait on that)."""
        with self._connecting:
            if self._client is not None and self._client.status != "running":
                log.warning("%s was lost (client %s); connecting again", self._where, self._client.status)
                self._drop_client()
            if self._client is None:
                self._client = dask_client(self._scheduler, self._workers)
                self._shares = FairShares()  # the lost client's tasks, cancelled, give their bands back to the old one
            return self._client

    def start(
        self,
        caller: Caller,
        runs: list[RunName],
        layers: list[int],
        params: DensityParams,
        mask: Mask,
        pairs: list[tuple[RunName, RunName]],
        k: int,
        request_id: str,
    ) -> Job:
        """A new job (or the one this request id of this owner already started); BadRequest for neighbour
        counts the runs cannot meet, TooSmall for runs too small for any analysis, TooLarge when the owner
        already runs its quota of jobs."""
        plan = Plan.of(runs, layers, pairs, params, mask, k)
        smallest_run_samples = plan.check_size(Store(self.store))
        owner = caller.owner
        with self._lock:
            self._forget_ended()
            request = (owner, request_id)
            if request_id and request in self._by_request:
                return self._jobs[self._by_request[request]]
            running = sum(1 for job in self._jobs.values() if job.caller.owner == owner and not job.finished)
            if running >= self.max_running:
                who = "you already have" if caller.is_open else "your group already has"
                raise TooLarge(
                    f"{who} {running} analysis jobs queued or running, the most allowed at once; "
                    "wait for one to end or cancel one"
                )
            job = Job(
                uuid.uuid4().hex[:16], caller, plan.total, (self.store, plan), plan.settings(smallest_run_samples)
            )
            self._jobs[job.id] = job
            if request_id:
                self._by_request[request] = job.id
        self._queue.put((job, plan))
        return job

    def get(self, job_id: str, caller: Caller) -> Job:
        """The job, if ``caller``'s group sees it (under open access every caller sees every job, as it reads
        every run); JobNotFound otherwise."""
        job = self._jobs.get(job_id)
        if job is None or job.caller.group != caller.group:  # another group's job is as good as absent
            raise JobNotFound(
                f"no job {echo(job_id)} on this server (a job lives in the memory of the server "
                f"replica that started it, for {self.keep_ended_s / 3600:g} h after it ends, at "
                f"most {self.max_kept} per group, and until it restarts; its results are in the "
                f"store: starting the same analysis again on any replica answers from there)"
            )
        return job

    def owned(self, caller: Caller) -> list[Job]:
        """The jobs ``caller`` owns (those it may cancel: its group's, or under open access its own), newest
        first; never another caller's, whoever may see them by id."""
        with self._lock:
            self._forget_ended()
            mine = [job for job in self._jobs.values() if job.caller.owner == caller.owner]
        return sorted(mine, key=lambda job: job.created.ToNanoseconds(), reverse=True)

    def _forget_ended(self) -> None:
        """Forget ended jobs past their time, and past the owner's count of kept jobs, oldest ended first."""
        now, kept, forget = time.monotonic(), Counter(), set()
        ended = sorted((job for job in self._jobs.values() if job.ended_at is not None), key=lambda j: -j.ended_at)
        for job in ended:  # newest first
            kept[job.caller.owner] += 1
            if now - job.ended_at > self.keep_ended_s or kept[job.caller.owner] > self.max_kept:
                forget.add(job.id)
        for job_id in forget:
            del self._jobs[job_id]
        self._by_request = {request: job_id for request, job_id in self._by_request.items() if job_id not in forget}

    def cancel(self, job_id: str, caller: Caller) -> Job:
        """Cancel the job if ``caller`` owns it: JobNotFound when its group does not see it, Forbidden
        (PERMISSION_DENIED) when it sees it but did not start it (under open access, another caller's)."""
        job = self.get(job_id, caller)
        if job.caller.owner != caller.owner:
            raise Forbidden(
                f"job {echo(job_id)} was started by another caller: only the caller that started a job "
                "may cancel it (under open access a caller is its host and the token it sends, if any)"
            )
        job.end(pb.JOB_STATE_CANCELLED, "cancelled")
        return job

    def close(self) -> None:
        self._queue.put(None)
        self._dispatcher.join(timeout=60)
        with self._connecting:
            self._drop_client()

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()  # and the local cluster, which dask_client made it own

    def _dispatch(self) -> None:
        """The dispatcher thread: submits queued jobs and keeps the local cluster at its size."""
        while True:
            try:
                item = self._queue.get(timeout=CHECK_S)
            except queue.Empty:
                item = ()
            if item is None:
                return
            if item:
                self._submit(*item)
            try:
                if self._client is not None and (missing := restore_workers(self._client)):
                    log.warning("%d Dask workers were lost; starting them again", missing)
            except Exception:  # noqa: BLE001 - the next check tries again; the dispatcher must go on
                log.exception("could not restore the local cluster's workers")
            self._say_when_no_workers()

    def _say_when_no_workers(self) -> None:
        """Running jobs' stage says so while the cluster has no worker: their tasks wait, without a timeout,
        for one to join (an external cluster's operator may start them later), and a caller watching such a
        job must learn why nothing moves rather than see "running" forever."""
        running = [job for job in list(self._jobs.values()) if job.state == pb.JOB_STATE_RUNNING]
        client = self._client
        if not running or client is None or client.status != "running":
            return
        try:
            workers = client.scheduler_info(n_workers=0).get("n_workers")
        except Exception:  # noqa: BLE001 - a lost scheduler ends the jobs through their tasks
            return
        stage = "running" if workers != 0 else f"waiting: {self._where} has no workers (tasks run once one joins)"
        for job in running:
            if job.stage != stage:
                job.update(stage=stage)

    def _submit(self, job: Job, plan: Plan) -> None:
        """Submit the job's tasks; any failure to do so (the scheduler unreachable, the local cluster not
        starting) ends it FAILED, never the dispatcher."""
        if not job.update(stage="starting workers" if self._client is None else "submitting"):
            return  # cancelled while queued
        try:
            client = self.client()
        except Exception as exc:  # noqa: BLE001 - OSError and TimeoutError mostly
            job.end(
                pb.JOB_STATE_FAILED,
                f"failed: {self._where} is unreachable ({type(exc).__name__}: {exc})",
                grpc.StatusCode.UNAVAILABLE,
            )
            return
        shares, owner = self._shares, job.caller.owner
        first = shares.take(owner, plan.total)
        try:
            futures = submit_layers(
                client,
                self.store,
                list(plan.runs),
                list(plan.layers),
                plan.params,
                plan.mask,
                list(plan.pairs),
                plan.k,
                priority=-first,
            )
        except Exception as exc:  # noqa: BLE001 - e.g. the client closed meanwhile
            for band in range(first, first + plan.total):
                shares.give_back(owner, band)
            job.end(
                pb.JOB_STATE_FAILED,
                f"failed: submitting to {self._where}: {type(exc).__name__}: {exc}",
                grpc.StatusCode.UNAVAILABLE,
            )
            return
        for band, future in enumerate(futures, first):  # before the job can end: a cancel fires these too
            future.add_done_callback(lambda done, band=band: shares.give_back(owner, band))
        if not job.update(client=client, futures=futures, state=pb.JOB_STATE_RUNNING, stage="running"):
            client.cancel(futures)  # cancelled while starting
            return
        for future in futures:
            future.add_done_callback(lambda done, job=job: self._task_done(job, done))

    def _task_done(self, job: Job, future: Future) -> None:
        """On Dask's callback thread: a task's outcome for its job, or the job's failure."""
        if job.finished:
            return
        try:
            job.add(future.result())
            return
        except CancelledError:  # not by the job (it has ended then): Dask lost the scheduler, or was closed
            lost = self._client is not future.client or future.client.status != "running"
            reason = (
                f"{self._where} is unreachable (lost while the job ran)"
                if lost
                else f"Dask cancelled task {future.key}"
            )
            failure = grpc.StatusCode.UNAVAILABLE
        except KilledWorker as exc:  # the workers running this task died more often than Dask allows
            reason, failure = f"{type(exc).__name__}: {exc}", grpc.StatusCode.ABORTED
        except Exception as exc:  # noqa: BLE001 - the job reports it; the server goes on
            reason, failure = f"{type(exc).__name__}: {exc}", status_of(exc)  # CorruptData: DATA_LOSS
        log.error("job %s failed: %s", job.id, reason)
        job.end(pb.JOB_STATE_FAILED, f"failed: {reason}", failure)
