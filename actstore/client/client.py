"""The Python client: runs, labels and hidden states from an actstore server, as xarray objects."""

from __future__ import annotations

import json
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import xarray as xr

from actstore.protocol import CHANNEL_OPTIONS, DEFAULT_ADDRESS, DTYPE_ENUMS, DTYPE_NAMES, VISIBILITY_ENUMS, VISIBILITY_NAMES
from actstore.address import parse_addresses
from actstore.v1 import actstore_pb2 as pb
from actstore.wire.results import dendrogram_of, layer_result, results_dataset
from actstore.wire.states import MalformedBlock, decode_block
from actstore.v1 import actstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

Layers = int | Sequence[int] | range | slice | None
Labels = str | Sequence[str] | None

DEFAULT_TIMEOUT_S = 30.0  # deadline of each unary call: a stalled server must not hang its callers
DEFAULT_STREAM_TIMEOUT_S = 600.0  # deadline of a whole ReadStates stream (the server caps its size)
DEFAULT_RETRY_FOR_S = 10.0  # how long UNAVAILABLE is retried: enough to ride over a quick server restart
RETRY_ENV = "ACTSTORE_RETRY_FOR"  # the shell's way to set retry_for (actstore query, analyze)
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 2.0
CLIENT_OPTIONS = [
    *CHANNEL_OPTIONS,
    # Reconnect at least every second once the server is gone (gRPC's default backoff grows to minutes),
    # so that a retry finds a restarted server within the retry window.
    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000),
    # Ping a silent server every 20 s, however long the call has been idle, and drop the connection if it
    # does not answer within 10 s, so that a call without a deadline (WatchJob, or timeout=None) cannot
    # hang on a stalled server; gRPC's own pings would otherwise wait 60 s for their answer and hold the
    # keepalive back meanwhile. actstore's server accepts pings this often (app.SERVER_OPTIONS).
    ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000), ("grpc.http2.max_pings_without_data", 0),
]
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


class ActstoreError(Exception):
    """A call the server refused or failed: ``code`` is the gRPC status, the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class Client:
    """A connection to an actstore server.

    >>> with Client("127.0.0.1:50051", token=...) as client:
    ...     states = client.hidden_states("SmolLM2-135M-Instruct.Q4_1", "5shot", layers=7, subject="anatomy")
    ...     states.values  # numpy (layer, sample, hidden)
    """

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        token: str | None = None,
        tls: bool | str | Path = False,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT_S,
        retry_for: float = DEFAULT_RETRY_FOR_S,
        retries: int | None = None,
    ) -> None:
        """``address``: HOST[:PORT], port 50051 unless given; or several replicas serving the same store, as a
        list or one comma-separated string (``"h1:50051,h2:50051"``), whose calls gRPC spreads round-robin
        (see ``channel_target``). ``tls``: True for the system's CA roots, or the path of a PEM CA bundle
        (e.g. a self-signed cert).

        ``timeout``: deadline in seconds of each call but ``hidden_states``, whose whole stream has
        ``stream_timeout`` (None: no deadline; keepalive pings still end a call to a stalled server within
        ~30 s, as they do ``AnalysisJob.watch``). UNAVAILABLE (server down or restarting, a run briefly
        locked) is retried for ``retry_for`` seconds (longer to ride over a slow restart), at most ``retries``
        times when given, with exponential backoff and jitter.
        """
        if not retry_for >= 0:
            raise ValueError(f"retry_for must be 0 or more seconds, not {retry_for}")
        target, options = channel_target(address)
        self._shown = (",".join(address) if not isinstance(address, str) else address, bool(token), bool(tls))
        options = [*CLIENT_OPTIONS, *options]
        if tls:
            roots = None if tls is True else Path(tls).read_bytes()
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout, self._stream_timeout = timeout, stream_timeout
        self._retry_for, self._retries = retry_for, retries
        self._catalog = pb_grpc.CatalogServiceStub(self._channel)
        self._data = pb_grpc.DataServiceStub(self._channel)
        self._analysis = pb_grpc.AnalysisServiceStub(self._channel)

    def __repr__(self) -> str:
        address, token, tls = self._shown  # never the token itself
        return f"<Client {address} ({'with' if token else 'no'} token, {'TLS' if tls else 'plaintext'})>"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- catalog ----------------------------------------------------------------------------------

    def runs(self, model: str | None = None, method: str | None = None, page_size: int = 100) -> list[dict]:
        """Every run this caller may read, as dicts, following the server's pages."""
        found, token = [], ""
        while True:
            page = self._call(self._catalog.ListRuns, pb.ListRunsRequest(
                model=model or "", method=method or "", page_size=page_size, page_token=token))
            found += [_summary(r) for r in page.runs]
            token = page.next_page_token
            if not token:
                return found

    def describe(self, model: str, method: str) -> dict:
        info = self._call(self._catalog.DescribeRun, pb.DescribeRunRequest(run=_ref(model, method)))
        return _info(info)

    def set_visibility(self, model: str, method: str, visibility: str, shared_with: Iterable[str] = ()) -> dict:
        """Owner only: make a run private, shared with named groups, or public."""
        if visibility not in VISIBILITY_ENUMS:
            raise ValueError(f"visibility must be one of {', '.join(VISIBILITY_ENUMS)}")
        info = self._call(self._catalog.SetVisibility, pb.SetVisibilityRequest(
            run=_ref(model, method), visibility=VISIBILITY_ENUMS[visibility], shared_with=list(shared_with)))
        return _info(info)

    # -- data -------------------------------------------------------------------------------------

    def labels(self, model: str, method: str, samples: Sequence[int] | slice | None = None,
               subject: Labels = None, answer: Labels = None, **filters: Labels) -> xr.Dataset:
        """Per-sample labels (subject, answer, prediction, correct) indexed by sample id."""
        request = pb.ReadLabelsRequest(run=_ref(model, method),
                                       samples=_samples(samples, {"subject": subject, "answer": answer, **filters}))
        response = self._call(self._data.ReadLabels, request)
        return xr.Dataset(coords=_label_coords(response.labels), attrs={"run_complete": response.run_complete})

    def hidden_states(
        self,
        model: str,
        method: str,
        layers: Layers = None,
        samples: Sequence[int] | slice | None = None,
        subject: Labels = None,
        answer: Labels = None,
        hidden: slice | None = None,
        dtype: str = "float32",
        allow_lossy: bool = False,
        **filters: Labels,
    ) -> xr.DataArray:
        """States as a DataArray (layer, sample, hidden) with the sample labels as coordinates.

        ``samples``: a list of sample ids, or a slice of positions along the run's sample axis;
        ``subject``, ``answer`` (and ``prediction``, ``correct``): keep samples with these labels.
        """
        request = pb.ReadStatesRequest(
            run=_ref(model, method), samples=_samples(samples, {"subject": subject, "answer": answer, **filters}),
            dtype=DTYPE_ENUMS[dtype], allow_lossy=allow_lossy, accept_blosc=True, **_layers(layers))
        if hidden is not None:
            request.hidden_range.CopyFrom(_range(hidden))
        header, data = self._retry(lambda: self._stream(request))
        return xr.DataArray(
            data, dims=tuple(header.dims),
            coords={"layer": list(header.layers), **_label_coords(header.labels),
                    "hidden": np.arange(header.hidden_start, header.hidden_start + data.shape[2])},
            name="hidden_states", attrs={"model": model, "method": method, "run_complete": header.run_complete})

    def _stream(self, request: pb.ReadStatesRequest) -> tuple[pb.StatesHeader, np.ndarray]:
        stream = self._data.ReadStates(request, metadata=self._metadata, timeout=self._stream_timeout)
        try:
            header = None
            received = 0
            for message in stream:
                if header is None:
                    header = message.header
                    data = np.empty(tuple(header.shape), dtype=DTYPE_NAMES[header.dtype])
                    flat = data.reshape(-1).view(np.uint8)
                chunk = message.chunk
                flat[chunk.offset : chunk.offset + len(chunk.data)] = np.frombuffer(chunk.data, dtype=np.uint8)
                received += len(chunk.data)
                for block in message.blocks:  # stored chunks, forwarded undecoded by the server
                    received += decode_block(block, data[block.layer_index])
        except MalformedBlock as exc:
            raise ActstoreError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        finally:
            stream.cancel()  # a no-op once complete; stops the server's work if we leave early
        if header is None:
            raise ActstoreError(grpc.StatusCode.DATA_LOSS, "the server's stream ended before its header")
        if received != flat.size:
            raise ActstoreError(grpc.StatusCode.DATA_LOSS, f"received {received} of {flat.size} bytes")
        return header, data

    # -- analyses ---------------------------------------------------------------------------------

    def analyze(self, model: str, methods: Sequence[str], layers: Sequence[int] | range | None = None,
                preset: str = "paper", per_subject: int | None = None, request_id: str = "",
                compare: Sequence[tuple[str, str]] = (), compare_k: int | None = None,
                **params: float) -> "AnalysisJob":
        """Start the density analyses of ``model``'s runs ``methods`` at ``layers`` (default: all but 0).

        ``compare``: pairs of runs to compare at each layer, each a method of ``model`` or a
        ``"model/method"`` of another model, e.g. ``[("0shot", "5shot")]``; both runs of a pair are
        analysed too. ``params`` override the preset: maxk, gride_range_max, id_scale_index, density_k,
        z, subject_fraction, answer_fraction. Returns at once; see AnalysisJob.watch and .result.
        """
        request = pb.StartAnalysisRequest(
            runs=[_ref(model, m) for m in methods], layers=list(layers or []), preset=preset,
            params=pb.AnalysisParams(**params), request_id=request_id,
            compare=[pb.RunPair(a=_run_of(model, a), b=_run_of(model, b)) for a, b in compare])
        if per_subject is not None:
            request.per_subject = per_subject
        if compare_k is not None:
            request.compare_k = compare_k
        return AnalysisJob(self, self._call(self._analysis.StartAnalysis, request).job_id)

    def compare(self, model: str, method_a: str, method_b: str, layers: Sequence[int] | range | None = None,
                **options: Any) -> "AnalysisJob":
        """Compare two runs layer by layer (data overlap, ARI between clusterings): ``method_b`` may be a
        ``"model/method"`` of another model. ``options`` as for ``analyze``; the job's result holds both
        runs' metrics and the comparison (``data_overlap``, ``ari_clusters`` over (pair, layer))."""
        return self.analyze(model, [], layers, compare=[(method_a, method_b)], **options)

    # -- plumbing ---------------------------------------------------------------------------------

    def _call(self, method: Callable[..., T], request: Any) -> T:
        return self._retry(lambda: method(request, metadata=self._metadata, timeout=self._timeout))

    def _retry(self, attempt: Callable[[], T]) -> T:
        """Retry UNAVAILABLE for ``retry_for`` seconds: backoff doubling from 0.1 s to 2 s, each delay drawn
        from its upper half so that clients who lost the same server do not come back in step.

        Not gRPC's retryPolicy service config: it allows at most 5 attempts with delays drawn from zero up,
        so its total wait is too short and too random to span a server restart; and it would not cover
        a stream that fails after its first message.
        """
        started, retried = time.monotonic(), 0
        while True:
            try:
                return attempt()
            except grpc.RpcError as exc:
                code = exc.code()
                delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2**retried) * random.uniform(0.5, 1.0)
                capped = self._retries is not None and retried >= self._retries
                if code is not grpc.StatusCode.UNAVAILABLE or capped:
                    raise ActstoreError(code, exc.details() or "") from None
                if time.monotonic() + delay > started + self._retry_for:
                    raise ActstoreError(code, _gave_up(exc.details() or "", self._retry_for)) from None
                log.info("server unavailable (%s); retrying in %.1f s", exc.details(), delay)
                time.sleep(delay)
                retried += 1


def _gave_up(details: str, window: float) -> str:
    """UNAVAILABLE once the retry window is spent: what happened, and how to wait longer."""
    return (f"{details} (still unavailable after retrying for {window:g} s: the server is down, restarting or "
            f"unreachable; to wait longer pass Client(retry_for=SECONDS), or `actstore query --retry-for SECONDS` "
            f"or ${RETRY_ENV})")


def channel_target(address: str | Sequence[str]) -> tuple[str, list[tuple[str, str]]]:
    """The gRPC target of one address or of several replicas, and the channel options it needs.

    One address is dialled as given (gRPC's default ``pick_first``), exactly as before replicas existed.
    Several become one channel over gRPC's static resolver, ``ipv4:IP:PORT,IP:PORT`` (or ``ipv6:``), with
    the ``round_robin`` policy: gRPC keeps a connection to each replica, sends each call to the next ready
    one and skips a replica whose connection is lost, so ``Client._retry`` lands a retried call elsewhere.
    gRPC offers no target that lists several host *names* (``dns:`` resolves one name, and ``ipv4:``/``ipv6:``
    take literals only), so names are resolved here, once, with ``getaddrinfo``: a replica that moves to
    another IP needs a new Client. One address family serves all replicas (IPv4 when every name has one).

    The channel's authority, which TLS checks the certificates against, is the first address's host (gRPC
    would otherwise take the comma-separated list): every replica's certificate must name that host, e.g.
    one certificate for the service's name shared by the replicas, or one that lists every replica's name.
    """
    addresses = parse_addresses(address)
    if len(addresses) == 1:
        return addresses[0], []
    hosts_ports = [a.rsplit(":", 1) for a in addresses]
    family, literals = _one_family([_resolve(host.strip("[]"), int(port)) for host, port in hosts_ports])
    scheme, shown = ("ipv4", "{}:{}") if family == socket.AF_INET else ("ipv6", "[{}]:{}")
    target = f"{scheme}:" + ",".join(shown.format(ip, port) for ip, (_, port) in zip(literals, hosts_ports))
    authority = hosts_ports[0][0].strip("[]")
    return target, [("grpc.service_config", ROUND_ROBIN), ("grpc.default_authority", authority),
                    ("grpc.ssl_target_name_override", authority)]


def _resolve(host: str, port: int) -> dict[int, str]:
    """The first IPv4 and the first IPv6 address of ``host``, by family."""
    try:
        found = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve the server address {host}: {exc.strerror}") from None
    by_family: dict[int, str] = {}
    for family, *_, sockaddr in found:
        if family in (socket.AF_INET, socket.AF_INET6):
            by_family.setdefault(family, sockaddr[0])
    return by_family


def _one_family(resolved: list[dict[int, str]]) -> tuple[int, list[str]]:
    """One address family that every replica has (a gRPC target holds one), and each replica's IP in it."""
    for family in (socket.AF_INET, socket.AF_INET6):
        if all(family in r for r in resolved):
            return family, [r[family] for r in resolved]
    raise ValueError("the server addresses mix IPv4 and IPv6: gRPC balances over one family; give names or "
                     "IPs of one family")


class AnalysisJob:
    """A running analysis: ``watch()`` yields progress, ``result()`` waits and returns an xarray Dataset."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id
        self._done: pb.Job | None = None

    def __repr__(self) -> str:
        state = pb.JobState.Name(self._done.state) if self._done is not None else "not waited on"
        return f"<AnalysisJob {self.id} on {self.client._shown[0]}: {state}>"

    def status(self) -> pb.Job:
        return self.client._call(self.client._analysis.GetJob, pb.JobRef(job_id=self.id))

    def watch(self) -> Iterator[pb.Job]:
        """The job after each change (layers done, stage), ending when it is done or cancelled; each event
        holds the results of the layers finished since the previous one."""
        stream = self.client._analysis.WatchJob(pb.JobRef(job_id=self.id), metadata=self.client._metadata)
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
        return self.client._call(self.client._analysis.CancelJob, pb.JobRef(job_id=self.id))

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
        return xr.DataArray(np.asarray(r.assignment), dims="sample", coords={"sample": np.asarray(r.sample_ids)},
                            name="cluster")

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


def _job_error(job_id: str, last: pb.Job | None) -> ActstoreError:
    """Why a job ended without results, as the status its failure carries (DATA_LOSS for corrupt bytes...)."""
    if last is None:
        return ActstoreError(grpc.StatusCode.UNKNOWN, f"job {job_id} ended without a state")
    if last.state == pb.JOB_STATE_FAILED:
        code = _STATUS_CODES.get(last.failure_code, grpc.StatusCode.UNKNOWN)
        return ActstoreError(code, f"job {job_id} {last.stage}")
    return ActstoreError(grpc.StatusCode.CANCELLED, f"job {job_id} ended as {pb.JobState.Name(last.state)}")


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

def _ref(model: str, method: str) -> pb.RunRef:
    return pb.RunRef(model=model, method=method)


def _run_of(model: str, name: str) -> pb.RunRef:
    """A method of ``model``, or a ``"model/method"`` naming another model's run."""
    other, _, method = name.rpartition("/")
    return _ref(other or model, method)


def _range(s: slice | range) -> pb.Range:
    if s.step not in (None, 1):
        raise ValueError("only contiguous ranges (step 1) are supported")
    if s.start is None or s.stop is None:
        raise ValueError("a range needs a start and a stop")
    return pb.Range(start=s.start, stop=s.stop)


def _layers(layers: Layers) -> dict:
    if layers is None:
        return {}
    if isinstance(layers, int):
        return {"layers": [layers]}
    if isinstance(layers, (slice, range)):
        return {"layer_range": _range(layers)}
    return {"layers": list(layers)}


def _samples(samples: Sequence[int] | slice | None, filters: dict[str, Labels]) -> pb.SampleSelection:
    selection = pb.SampleSelection(filters=[
        pb.LabelFilter(name=name, values=[str(v) for v in ([values] if isinstance(values, (str, bool)) else values)])
        for name, values in filters.items() if values is not None])
    if isinstance(samples, slice):
        selection.positions.CopyFrom(_range(samples))
    elif samples is not None:
        selection.ids.extend(int(i) for i in samples)
    return selection


def _label_coords(labels: pb.Labels) -> dict[str, Any]:
    return {
        "sample": np.asarray(labels.sample, dtype=np.int64),
        **{name: ("sample", np.asarray(getattr(labels, name), dtype=str))  # object arrays deep-copy slowly
           for name in ("subject", "answer", "prediction")},
        "correct": ("sample", np.asarray(labels.correct, dtype=bool)),
    }


def _summary(s: pb.RunSummary) -> dict:
    return {
        "model": s.run.model, "method": s.run.method, "n_layers": s.n_layers, "n_samples": s.n_samples,
        "hidden": s.hidden, "accuracy": s.accuracy if s.HasField("accuracy") else None, "complete": s.complete,
        "owner_group": s.access.owner_group or None, "visibility": VISIBILITY_NAMES.get(s.access.visibility),
        "shared_with": list(s.access.shared_with),
    }


def _info(info: pb.RunInfo) -> dict:
    return {
        **_summary(info.summary), "dtype": info.dtype, "layers": list(info.layers),
        "labels": {lv.name: list(lv.values) for lv in info.labels}, "size_bytes": info.size_bytes,
        "recipe": json.loads(info.recipe_json or "{}"), "attributes": json.loads(info.attributes_json or "{}"),
    }
