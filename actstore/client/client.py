"""The Python client: runs, labels and hidden states from an actstore server, as xarray objects, and
analysis jobs started there."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from actstore.client.channel import channel_target  # noqa: F401 - where tests and tools look it up
from actstore.client.connection import Connection
from actstore.client.jobs import AnalysisJob
from actstore.client.records import run_info, run_summary
from actstore.client.requests import (
    Labels,
    Layers,
    Positions,
    range_of,
    run_of,
    run_ref,
    sample_selection,
    states_request,
)
from actstore.client.states import receive_states
from actstore.protocol import VISIBILITY_ENUMS
from actstore.v1 import actstore_pb2 as pb
from actstore.wire.columns import column_coords
from actstore.wire.labels import label_coords


class Client(Connection):
    """A connection to an actstore server (address, token, TLS, deadlines and retries: see ``Connection``).

    >>> with Client("127.0.0.1:50051", token=...) as client:
    ...     states = client.hidden_states("SmolLM2-135M-Instruct.Q4_1", "5shot", layers=7, subject="anatomy")
    ...     states.values  # numpy (layer, sample, hidden)
    ...     tokens = client.hidden_states("my-model", "0shot", site="mlp_out", positions=[0, -1], topic="news")
    ...     tokens.position  # a capture run's rows (layer, token, hidden), with their coordinates
    """

    # -- catalog ----------------------------------------------------------------------------------

    def runs(self, model: str | None = None, method: str | None = None, page_size: int = 100) -> list[dict]:
        """Every run this caller may read, as dicts, following the server's pages."""
        found, token = [], ""
        while True:
            page = self.call(
                self.catalog_stub.ListRuns,
                pb.ListRunsRequest(model=model or "", method=method or "", page_size=page_size, page_token=token),
            )
            found += [run_summary(r) for r in page.runs]
            token = page.next_page_token
            if not token:
                return found

    def describe(self, model: str, method: str) -> dict:
        return run_info(self.call(self.catalog_stub.DescribeRun, pb.DescribeRunRequest(run=run_ref(model, method))))

    def set_visibility(self, model: str, method: str, visibility: str, shared_with: Iterable[str] = ()) -> dict:
        """Owner only: make a run private, shared with named groups, or public."""
        if visibility not in VISIBILITY_ENUMS:
            raise ValueError(f"visibility must be one of {', '.join(VISIBILITY_ENUMS)}")
        info = self.call(
            self.catalog_stub.SetVisibility,
            pb.SetVisibilityRequest(
                run=run_ref(model, method), visibility=VISIBILITY_ENUMS[visibility], shared_with=list(shared_with)
            ),
        )
        return run_info(info)

    # -- data -------------------------------------------------------------------------------------

    def labels(
        self,
        model: str,
        method: str,
        samples: Sequence[int] | slice | None = None,
        subject: Labels = None,
        answer: Labels = None,
        positions: Positions = None,
        tokens: slice | range | None = None,
        rows: Sequence[int] | None = None,
        **filters: Labels,
    ) -> xr.Dataset:
        """Per-sample labels (subject, answer, prediction, correct) indexed by sample id; for a capture run, the
        coordinates of its rows (sample, position, token_id and its label columns), selected as in
        ``hidden_states``."""
        request = pb.ReadLabelsRequest(
            run=run_ref(model, method),
            samples=sample_selection(
                samples, {"subject": subject, "answer": answer, **filters}, positions, tokens, rows
            ),
        )
        response = self.call(self.data_stub.ReadLabels, request)
        attrs = {"run_complete": response.run_complete}
        if response.columns:
            return xr.Dataset(coords=column_coords(response.columns, response.row_dim), attrs=attrs)
        return xr.Dataset(coords=label_coords(response.labels), attrs=attrs)

    def hidden_states(
        self,
        model: str,
        method: str,
        layers: Layers = None,
        samples: Sequence[int] | slice | None = None,
        subject: Labels = None,
        answer: Labels = None,
        hidden: slice | None = None,
        dtype: str | None = None,
        allow_lossy: bool = False,
        site: str | None = None,
        positions: Positions = None,
        tokens: slice | range | None = None,
        rows: Sequence[int] | None = None,
        out: np.ndarray | None = None,
        **filters: Labels,
    ) -> xr.DataArray:
        """States as a DataArray (layer, sample, hidden) with the sample labels as coordinates.

        ``samples``: a list of sample ids, or a slice of positions along the run's sample axis;
        ``subject``, ``answer`` (and ``prediction``, ``correct``): keep samples with these labels.
        ``dtype``: "float32" or "float16" (refused where it would round, unless ``allow_lossy``); None: as stored.

        A capture run gives one ``site`` (None: its first) as a DataArray named after it, (layer, token, hidden)
        or, one row per text, (layer, sample, hidden) (a site of another width: ``{site}.hidden``), with the
        rows' sample, position, token_id and label columns as coordinates. ``samples``: the texts' ids (every
        row of each); ``positions``: token positions in each text, negative from its end; ``tokens``: a slice of
        the run's rows; ``rows``: rows by index, in the order given; ``filters``: any label column, values
        compared as text (``topic="news"``, ``n=[1, 2]``).

        ``out``: a C-contiguous array of the answer's shape and dtype to decode into, which the DataArray then
        wraps (ValueError if it does not fit; on any error its contents are undefined). Reading many pieces
        into one buffer so skips allocating each answer, whose pages the kernel would zero first.
        """
        labels = {"subject": subject, "answer": answer, **filters}
        request = states_request(
            model, method, layers, site, sample_selection(samples, labels, positions, tokens, rows), dtype, allow_lossy
        )
        if hidden is not None:
            request.hidden_range.CopyFrom(range_of(hidden))
        header, data = self.read_states(request, out)
        attrs = {"model": model, "method": method, "run_complete": header.run_complete}
        width = {header.dims[2]: np.arange(header.hidden_start, header.hidden_start + data.shape[2])}
        if header.columns:  # a capture run
            coords = {"layer": list(header.layers), **column_coords(header.columns, header.dims[1]), **width}
            return xr.DataArray(
                data, dims=tuple(header.dims), coords=coords, name=header.site, attrs={**attrs, "site": header.site}
            )
        return xr.DataArray(
            data,
            dims=tuple(header.dims),
            coords={"layer": list(header.layers), **label_coords(header.labels), **width},
            name="hidden_states",
            attrs=attrs,
        )

    def read_states(
        self, request: pb.ReadStatesRequest, out: np.ndarray | None = None
    ) -> tuple[pb.StatesHeader, np.ndarray]:
        """One ReadStates call as it arrives (retried while the server is unavailable): its header, whose rows'
        coordinates ``header_coords`` gives as numpy arrays, and the array, decoded into ``out`` when given.
        What ``hidden_states`` wraps in a DataArray; a caller reading many pieces (actstore.torch) skips that,
        which costs milliseconds an answer."""
        return self.retry(
            lambda: receive_states(self.stream(self.data_stub.ReadStates, request, self.stream_timeout), out)
        )

    # -- analyses ---------------------------------------------------------------------------------

    def analyze(
        self,
        model: str,
        methods: Sequence[str],
        layers: Sequence[int] | range | None = None,
        preset: str = "paper",
        per_subject: int | None = None,
        request_id: str = "",
        compare: Sequence[tuple[str, str]] = (),
        compare_k: int | None = None,
        site: str | None = None,
        reduction: str | None = None,
        label: str | None = None,
        **params: float,
    ) -> AnalysisJob:
        """Start the density analyses of ``model``'s runs ``methods`` at ``layers`` (default: all but 0).

        ``compare``: pairs of runs to compare at each layer, each a method of ``model`` or a
        ``"model/method"`` of another model, e.g. ``[("0shot", "5shot")]``; both runs of a pair are
        analysed too. ``params`` override the preset: maxk, gride_range_max, id_scale_index, density_k,
        z, subject_fraction, answer_fraction. The neighbour counts left unset (and ``compare_k``) are
        lowered to fit a smallest run of 100 samples or fewer; the result's ``attrs`` say what was used.
        Capture runs are analysed as a cloud: ``site`` (None: the first), ``reduction`` ("last" by default,
        "position:P", "mean", "sample:N[:SEED]"), and a ``label`` column whose ARI and overlap come as
        ari_subject and overlap_subject. Returns at once; see AnalysisJob.watch and .result.
        """
        request = pb.StartAnalysisRequest(
            runs=[run_ref(model, m) for m in methods],
            layers=list(layers or []),
            preset=preset,
            params=pb.AnalysisParams(**params),
            request_id=request_id,
            compare=[pb.RunPair(a=run_of(model, a), b=run_of(model, b)) for a, b in compare],
            site=site or "",
            reduction=reduction or "",
            label=label or "",
        )
        if per_subject is not None:
            request.per_subject = per_subject
        if compare_k is not None:
            request.compare_k = compare_k
        return AnalysisJob(self, self.call(self.analysis_stub.StartAnalysis, request).job_id)

    def jobs(self) -> list[AnalysisJob]:
        """This caller's analysis jobs on the server, newest first: its group's under an auth file, under
        open access those it started (its host and token); each a handle to watch, wait on or cancel."""
        listed = self.call(self.analysis_stub.ListJobs, pb.ListJobsRequest()).jobs
        return [AnalysisJob(self, job.job_id, job) for job in listed]

    def job(self, job_id: str) -> AnalysisJob:
        """Re-attach to a job started earlier, from this client or another (``jobs()`` lists them): a
        handle to watch, wait on or cancel; NOT_FOUND when the server does not know it."""
        job = AnalysisJob(self, job_id)
        job.status()
        return job

    def compare(
        self, model: str, method_a: str, method_b: str, layers: Sequence[int] | range | None = None, **options: Any
    ) -> AnalysisJob:
        """Compare two runs layer by layer (data overlap, ARI between clusterings): ``method_b`` may be a
        ``"model/method"`` of another model. ``options`` as for ``analyze``; the job's result holds both
        runs' metrics and the comparison (``data_overlap``, ``ari_clusters`` over (pair, layer))."""
        return self.analyze(model, [], layers, compare=[(method_a, method_b)], **options)
