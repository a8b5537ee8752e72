"""CatalogService: the runs a caller may read, paged; one run described; who may read a run."""

from __future__ import annotations

import json
import logging

from actstore.protocol import VISIBILITY_ENUMS, VISIBILITY_NAMES
from actstore.server import capture_rows, selection
from actstore.server.auth import Caller
from actstore.server.errors import Forbidden
from actstore.server.rpc import Servicer, rpc
from actstore.store import Run
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class CatalogService(Servicer, pb_grpc.CatalogServiceServicer):
    @rpc
    def ListRuns(self, request: pb.ListRunsRequest, caller: Caller) -> pb.ListRunsResponse:
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise selection.BadRequest(f"page_size must be within 0..{MAX_PAGE_SIZE}")
        size = request.page_size or DEFAULT_PAGE_SIZE
        runs = [
            r
            for r in self.store.runs()
            if (not request.model or r.model == request.model)
            and (not request.method or r.method == request.method)
            and caller.can_read(r.access)
        ]
        start = _page_start(request.page_token, runs)
        page = runs[start : start + size]
        more = start + size < len(runs)
        return pb.ListRunsResponse(
            runs=[summary(r) for r in page], next_page_token=f"{page[-1].model}/{page[-1].method}" if more else ""
        )

    @rpc
    def DescribeRun(self, request: pb.DescribeRunRequest, caller: Caller) -> pb.RunInfo:
        run = self.readable_run(request.run, caller)
        return describe(run)

    @rpc
    def SetVisibility(self, request: pb.SetVisibilityRequest, caller: Caller) -> pb.RunInfo:
        run = self.readable_run(request.run, caller)
        if not caller.owns(run.access):
            raise Forbidden(f"only the owner group {run.access['owner_group']!r} may change who reads this run")
        if request.visibility not in VISIBILITY_NAMES:
            raise selection.BadRequest("visibility must be private, shared or public")
        run = self.store.set_access(
            run.model,
            run.method,
            {"visibility": VISIBILITY_NAMES[request.visibility], "shared_with": list(request.shared_with)},
        )
        log.info("run %s/%s is now %s", run.model, run.method, run.access["visibility"])
        return describe(run)


def _page_start(token: str, runs: list[Run]) -> int:
    """Page tokens name the last run of the previous page, so pages stay stable as runs are added."""
    if not token:
        return 0
    keys = [f"{r.model}/{r.method}" for r in runs]
    if "/" not in token:
        raise selection.BadRequest("malformed page_token")
    return next((i for i, key in enumerate(keys) if key > token), len(keys))


def sites(run: Run) -> list[pb.SiteInfo]:
    """Each states array of the run: a capture run's sites as its layout records them (no array opened), a
    question run's one site."""
    capture = run.capture
    if capture is None:
        n_layers, _, hidden = run.shape
        return [pb.SiteInfo(name=run.default_site, n_layers=n_layers, width=hidden, dims=["layer", "sample", "hidden"])]
    return [
        pb.SiteInfo(
            name=site, n_layers=capture.n_layers, width=width, dims=["layer", capture.rows, capture.width_dim(site)]
        )
        for site, width in capture.sites.items()
    ]


def summary(run: Run) -> pb.RunSummary:
    n_layers, n_samples, hidden = run.shape
    access = run.access
    capture = run.capture
    return pb.RunSummary(
        run=pb.RunRef(model=run.model, method=run.method),
        n_layers=n_layers,
        n_samples=n_samples,
        hidden=hidden,
        accuracy=run.accuracy,
        complete=run.complete,
        access=pb.Access(
            owner_group=access["owner_group"] or "",
            visibility=VISIBILITY_ENUMS[access["visibility"]],
            shared_with=access["shared_with"],
        ),
        kind=pb.RUN_KIND_QUESTIONS if capture is None else pb.RUN_KIND_CAPTURE,
        sites=sites(run),
        row_dim=run.row_dim,
        n_texts=run.n_texts,
        store_dtype="float32" if capture is None else capture.store_dtype,
    )


def describe(run: Run) -> pb.RunInfo:
    labels = run.labels()
    attrs = run.attrs
    return pb.RunInfo(
        summary=summary(run),
        dtype=str(run.hidden_states.dtype),
        layers=list(range(run.shape[0])),
        labels=[
            pb.LabelValues(name=name, values=sorted({str(v) for v in labels[name]})) for name in selection.LABEL_NAMES
        ]
        if run.capture is None
        else capture_rows.label_values(run),
        size_bytes=run.size_bytes(),
        recipe_json=json.dumps(attrs.get("recipe", {})),
        attributes_json=json.dumps(attrs, default=str),
    )
