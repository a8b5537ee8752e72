"""One analysis job on a server, as its caller holds it: progress, result tables, cancel."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC
from typing import Any

import grpc
import numpy as np
import xarray as xr

from actstore.client.connection import Connection
from actstore.client.errors import ActstoreError
from actstore.v1 import actstore_pb2 as pb
from actstore.wire.results import dendrogram_of, layer_result, results_dataset

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class AnalysisJob:
    """A running analysis: ``watch()`` yields progress, ``result()`` waits and returns an xarray Dataset."""

    def __init__(self, client: Connection, job_id: str, seen: pb.Job | None = None) -> None:
        """The job ``job_id`` on ``client``'s server (a ``Client``): any caller its server lets see it.
        ``seen``: the job as last heard of (``Client.jobs``, ``Client.job``), which its repr shows."""
        self.client = client
        self.id = job_id
        self._seen = _summary(seen) if seen is not None else None
        self._done: pb.Job | None = None

    def __repr__(self) -> str:
        """Its id and server; its state, progress, runs and start once heard of ("not waited on" before)."""
        seen = self.seen
        if seen is None:
            return f"<AnalysisJob {self.id} on {self.client.address}: not waited on>"
        runs = f" of {', '.join(seen['runs'])}" if seen["runs"] else ""
        started = f", started {seen['started']:%Y-%m-%d %H:%M:%S}" if seen["started"] else ""
        return (
            f"<AnalysisJob {self.id} on {self.client.address}: {seen['state']} "
            f"{seen['tasks_done']}/{seen['tasks_total']} tasks{runs}{started}>"
        )

    @property
    def seen(self) -> dict[str, Any] | None:
        """The job as last heard of (listed, re-attached, ``status()`` or waited on), None before: its
        ``state`` ("running", "done"...), ``stage``, ``tasks_done``/``tasks_total``, ``runs`` ("model/method",
        and "a vs b" for each compared pair) and ``started`` (local time; None from an older server)."""
        last = self._done or self._seen
        if last is None:
            return None
        started = last.created.ToDatetime(tzinfo=UTC).astimezone() if last.HasField("created") else None
        return {
            "state": pb.JobState.Name(last.state).removeprefix("JOB_STATE_").lower(),
            "stage": last.stage,
            "tasks_done": last.tasks_done,
            "tasks_total": last.tasks_total,
            "started": started,
            "runs": [_name(r) for r in last.runs] + [f"{_name(p.a)} vs {_name(p.b)}" for p in last.compare],
        }

    def status(self) -> pb.Job:
        """The job now, with the results of its tasks finished so far."""
        job = self.client.call(self.client.analysis_stub.GetJob, pb.JobRef(job_id=self.id))
        self._seen = _summary(job)
        return job

    def watch(self) -> Iterator[pb.Job]:
        """The job after each change (layers done, stage), ending when it is done or cancelled; each event
        holds the results of the layers finished since the previous one."""
        stream = self.client.stream(self.client.analysis_stub.WatchJob, pb.JobRef(job_id=self.id), timeout=None)
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise ActstoreError(exc.code(), exc.details() or "") from None

    def follow(self, desc: str = "analysis") -> None:
        """Watch the job to its end with a progress bar of its tasks and its stage (on stderr)."""
        from tqdm import tqdm

        with tqdm(unit="task", desc=desc) as bar:
            for event in self.watch():
                bar.total = event.tasks_total
                bar.set_postfix_str(event.stage)
                bar.update(event.tasks_done - bar.n)

    def cancel(self) -> pb.Job:
        return self.client.call(self.client.analysis_stub.CancelJob, pb.JobRef(job_id=self.id))

    def result(self) -> xr.Dataset:
        """Wait for the job and return its table: every metric over (run, layer), comparisons over
        (pair, layer)."""
        return results_dataset(self._final())

    def dendrogram(self, run: str, layer: int) -> dict[str, Any] | None:
        """The density-peak dendrogram of one layer of one run (``"model/method"``): see dendrogram_of."""
        return dendrogram_of(self._final(), run, layer)

    def assignments(self, run: str, layer: int) -> xr.DataArray:
        """The clusters of one layer of one run (``"model/method"``), indexed by sample id."""
        r = layer_result(self._final(), run, layer)
        return xr.DataArray(
            np.asarray(r.assignment), dims="sample", coords={"sample": np.asarray(r.sample_ids)}, name="cluster"
        )

    def _final(self) -> pb.Job:
        """The ended job with every layer's results, gathered from the watch events."""
        if self._done is None:
            last, results, comparisons = None, [], []
            for last in self.watch():
                results.extend(last.results)
                comparisons.extend(last.comparisons)
            if last is None or last.state != pb.JOB_STATE_DONE:
                raise _job_error(self.id, last)
            del last.results[:], last.comparisons[:]
            last.results.extend(results)
            last.comparisons.extend(comparisons)
            self._done = last
        return self._done


def _summary(job: pb.Job) -> pb.Job:
    """The job without its results: what a handle keeps to show, however large the results."""
    summary = pb.Job()
    summary.CopyFrom(job)
    del summary.results[:], summary.comparisons[:]
    return summary


def _name(ref: pb.RunRef) -> str:
    return f"{ref.model}/{ref.method}"


def _job_error(job_id: str, last: pb.Job | None) -> ActstoreError:
    """Why a job ended without results, as the status its failure carries (DATA_LOSS for corrupt bytes...)."""
    if last is None:
        return ActstoreError(grpc.StatusCode.UNKNOWN, f"job {job_id} ended without a state")
    if last.state == pb.JOB_STATE_FAILED:
        code = _STATUS_CODES.get(last.failure_code, grpc.StatusCode.UNKNOWN)
        return ActstoreError(code, f"job {job_id} {last.stage}")
    return ActstoreError(grpc.StatusCode.CANCELLED, f"job {job_id} ended as {pb.JobState.Name(last.state)}")
