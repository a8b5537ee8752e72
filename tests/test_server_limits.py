"""A server no caller can stall, starve or fool: stalled streams, per-caller budgets, request and response
bounds, undecodable and unauthenticated requests, and a fuzz of every RPC. Real server, real sockets."""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from test_server import BIG, write_big_run

from actstore.cli import main
from actstore.client import Client
from actstore.server.process import ServerProcess
from actstore.store import Store
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc

TOKENS = {"tok-a-at-least-16-chars": "lab-a", "tok-b-at-least-16-chars": "lab-b", "tok-c-at-least-16-chars": "lab-c"}
A, B, C = (((("authorization", f"Bearer {t}"),)) for t in TOKENS)
LIMIT = 10  # streams per caller on the test server
N = 10  # stalled readers, and watchers: more than the 8 threads that served every call before
TINY = pb.RunRef(model="tiny-llama", method="0shot")
SMALL = dict(maxk=20, gride_range_max=16, id_scale_index=1, density_k=8)


@pytest.fixture(scope="module")
def idle_scheduler():
    """A real Dask scheduler without workers: jobs submitted to it stay running, at no CPU cost."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=":0")
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, questions_file):
    root = tmp_path_factory.mktemp("limits")
    store = root / "store"
    assert (
        main(
            [
                "ingest",
                "--store",
                str(store),
                "--model",
                str(tiny_model),
                "--dataset",
                str(questions_file),
                "--dtype",
                "float32",
                "--methods",
                "0shot",
                "--group",
                "lab-a",
                "--visibility",
                "public",
            ]
        )
        == 0
    )
    write_big_run(store)
    (root / "auth.toml").write_text("[tokens]\n" + "".join(f'"{t}" = "{g}"\n' for t, g in TOKENS.items()))
    return store


@pytest.fixture(scope="module")
def server(store, idle_scheduler):
    process = ServerProcess(
        store,
        store.parent / "server.log",
        "--auth",
        str(store.parent / "auth.toml"),
        "--max-response-mb",
        "150",
        "--max-streams-per-caller",
        str(LIMIT),
        "--scheduler",
        idle_scheduler,
    )
    yield process
    process.stop()


def reader(address: str, metadata) -> tuple[grpc.Channel, grpc.Future]:
    """A ReadStates of a 98 MB layer, started; its client reads nothing unless told to."""
    channel = grpc.insecure_channel(address)
    stream = pb_grpc.DataServiceStub(channel).ReadStates(
        pb.ReadStatesRequest(run=pb.RunRef(model=BIG[0], method=BIG[1]), layers=[0]), metadata=metadata, timeout=120
    )
    return channel, stream


def stalled_reader(address: str, metadata) -> tuple[grpc.Channel, grpc.Future]:
    """A reader that reads one message and then nothing more."""
    channel, stream = reader(address, metadata)
    next(stream)
    return channel, stream


def watcher(address: str, metadata, job_id: str) -> tuple[grpc.Channel, grpc.Future]:
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.AnalysisServiceStub(channel).WatchJob(
        pb.JobRef(job_id=job_id), metadata=metadata, timeout=120
    )


def close(streams: list) -> None:
    for channel, stream in streams:
        stream.cancel()
        channel.close()


def call_status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_stalled_readers_and_watchers_leave_the_server_to_everyone_else(server):
    readers, watchers = [], []
    try:
        with Client(server.address, token="tok-b-at-least-16-chars") as b:
            job = b.analyze("tiny-llama", ["0shot"], layers=[1, 2], **SMALL)  # never ends: no Dask worker
            readers += [reader(server.address, A) for _ in range(N)]  # none of them reads
            watchers += [watcher(server.address, B, job.id) for _ in range(N)]
            time.sleep(1)  # every stream under way on the server
            started = time.monotonic()
            with Client(
                server.address, token="tok-c-at-least-16-chars", timeout=5, stream_timeout=5, retries=0
            ) as fresh:
                assert [r["method"] for r in fresh.runs(model="tiny-llama")] == ["0shot"]
                assert fresh.hidden_states("tiny-llama", "0shot", layers=1).sizes["layer"] == 1
                assert fresh.labels("tiny-llama", "0shot").sizes["sample"] > 0
            assert time.monotonic() - started < 3, "a fresh caller waited behind stalled streams"
            assert all(next(stream).header.shape for _, stream in readers)  # each stream served, all at once
            assert all(next(stream).state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) for _, stream in watchers)
            job.cancel()
    finally:
        close(readers + watchers)


def test_a_caller_past_its_stream_limit_gets_resource_exhausted_and_its_budget_comes_back(server):
    opened = [stalled_reader(server.address, C) for _ in range(LIMIT)]
    try:
        code, details = call_status(lambda: stalled_reader(server.address, C))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"{LIMIT} streams open" in details, details
        with Client(server.address, token="tok-a-at-least-16-chars") as other:  # another group is unaffected
            assert other.hidden_states(*BIG, layers=0, samples=slice(0, 5)).sizes["sample"] == 5
        close(opened[:1])
        deadline = time.monotonic() + 10
        while (
            code := call_status(lambda: opened.append(stalled_reader(server.address, C)))[0]
        ) == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline:
            time.sleep(0.1)
        assert code == grpc.StatusCode.OK  # the cancelled stream gave its place back
    finally:
        close(opened[1:])


def raw_status(
    server: ServerProcess, method: str, body: bytes, metadata=A, timeout: float = 30
) -> tuple[grpc.StatusCode, str]:
    """Send ``body`` as the request of ``method`` (``/package.Service/Method``), undecoded: any bytes."""
    streaming = method.endswith(("/ReadStates", "/WatchJob"))
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        if streaming:
            stream = channel.unary_stream(method, request_serializer=None, response_deserializer=None)(
                body, metadata=metadata, timeout=timeout
            )
            return call_status(lambda: (list(itertools.islice(stream, 1)), stream.cancel()))
        return call_status(
            lambda: channel.unary_unary(method, request_serializer=None, response_deserializer=None)(
                body, metadata=metadata, timeout=timeout
            )
        )


def measured(server: ServerProcess, call: Callable[[], tuple]) -> tuple[tuple, float, int]:
    """The call's result, its seconds, and how far the server's RSS rose above its start meanwhile."""
    baseline, peak, done = server.rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], server.rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        result = call()
    finally:
        seconds = time.monotonic() - started
        done.set()
        sampler.join()
    return result, seconds, max(0, peak[0] - baseline)


def an_id(store) -> int:
    return int(Store(store).run("tiny-llama", "0shot").labels()["sample"][0])


@pytest.mark.parametrize(
    "method,request_type",
    [
        ("/actstore.v1.DataService/ReadStates", pb.ReadStatesRequest),
        ("/actstore.v1.DataService/ReadLabels", pb.ReadLabelsRequest),
    ],
)
def test_a_request_of_duplicate_ids_is_refused_before_any_work(server, store, method, request_type):
    body = request_type(run=TINY, samples=pb.SampleSelection(ids=[an_id(store)] * 900_000)).SerializeToString()
    (code, details), seconds, grew = measured(server, lambda: raw_status(server, method, body))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than once" in details, details
    assert seconds < 3 and grew < 64 * 2**20, f"{seconds:.1f} s, server grew by {grew / 2**20:.0f} MiB"


def test_too_many_ids_and_an_oversized_request_are_refused_in_bounded_memory(server):
    many = pb.ReadLabelsRequest(run=TINY, samples=pb.SampleSelection(ids=range(1_200_000))).SerializeToString()
    code, details = raw_status(server, "/actstore.v1.DataService/ReadLabels", many)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "split them over several requests" in details, details
    huge = pb.ReadStatesRequest(run=TINY, samples=pb.SampleSelection(ids=[7] * 12_000_000)).SerializeToString()
    assert len(huge) > 11 * 2**20
    (code, details), seconds, grew = measured(
        server, lambda: raw_status(server, "/actstore.v1.DataService/ReadStates", huge)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert seconds < 5 and grew < 64 * 2**20, f"{seconds:.1f} s, server grew by {grew / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "request_,words",
    [
        (pb.ReadStatesRequest(run=TINY, layers=[1, 1]), "layer 1 is asked for more than once"),
        (pb.ReadStatesRequest(run=TINY, layers=list(range(2)) * 3), "name each layer once"),
        (
            pb.ReadStatesRequest(
                run=TINY, samples=pb.SampleSelection(filters=[pb.LabelFilter(name="subject", values=["x"])] * 9)
            ),
            "more than there are labels",
        ),
    ],
)
def test_duplicates_are_invalid_arguments(server, request_, words):
    code, details = raw_status(server, "/actstore.v1.DataService/ReadStates", request_.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, details


def test_the_whole_response_labels_included_is_capped_before_streaming(server, store):
    big = pb.ReadStatesRequest(run=pb.RunRef(model=BIG[0], method=BIG[1])).SerializeToString()
    code, details = raw_status(server, "/actstore.v1.DataService/ReadStates", big)  # refused before message 1
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cap of 150 MiB" in details, details
    tight = ServerProcess(store, store.parent / "tight.log", "--max-response-mb", "0.0005")  # 524 bytes
    try:
        labels = pb.ReadLabelsRequest(run=TINY).SerializeToString()
        code, details = raw_status(tight, "/actstore.v1.DataService/ReadLabels", labels)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cap of 0.0005 MiB" in details, details
        thin = pb.ReadStatesRequest(run=TINY, layers=[1], hidden_range=pb.Range(start=0, stop=1))  # ~100 bytes of
        code, details = raw_status(tight, "/actstore.v1.DataService/ReadStates", thin.SerializeToString())  # states
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cap of 0.0005 MiB" in details, details
        one = pb.ReadStatesRequest(
            run=TINY, layers=[1], hidden_range=pb.Range(start=0, stop=1), samples=pb.SampleSelection(ids=[an_id(store)])
        )
        with Client(tight.address) as c:
            assert c.labels("tiny-llama", "0shot", samples=[an_id(store)]).sizes["sample"] == 1
        assert (
            raw_status(tight, "/actstore.v1.DataService/ReadStates", one.SerializeToString())[0] == grpc.StatusCode.OK
        )
    finally:
        tight.stop()


METHODS = [
    f"/{service.full_name}/{method.name}"
    for service in pb.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
GARBAGE = b"\xff" * 64  # a varint that never ends: no protobuf message


@pytest.mark.parametrize("method", METHODS)
def test_an_undecodable_request_is_invalid_and_an_unauthenticated_one_is_refused_first(server, method):
    assert raw_status(server, method, GARBAGE)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert raw_status(server, method, GARBAGE, metadata=())[0] == grpc.StatusCode.UNAUTHENTICATED
    bad_token = (("authorization", "Bearer not-a-token-of-this-server"),)
    assert raw_status(server, method, GARBAGE, metadata=bad_token)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_unauthenticated_garbage_costs_the_server_bounded_memory(server):
    """The issue saw grpcio keep ~19 KB per undecodable request; refused at the interceptor, before decoding."""
    count = 5000
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            "/actstore.v1.DataService/ReadLabels", request_serializer=None, response_deserializer=None
        )
        for _ in range(200):  # warm-up: the first calls fill caches and pools
            call_status(lambda: call(GARBAGE, timeout=10))
        before = server.rss_bytes()
        codes = {call_status(lambda: call(GARBAGE, timeout=10))[0] for _ in range(count)}
        grew = server.rss_bytes() - before
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}
    assert grew / count < 2048, f"{grew / count:.0f} bytes kept per refused request"


# -- fuzz --------------------------------------------------------------------------------------------

PRECISE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
}
STRINGS = [
    "tiny-llama",
    "0shot",
    BIG[0],
    BIG[1],
    "",
    "x" * 300,
    "../etc",
    "a/b",
    "\x00",
    "é",
    "paper",
    "subject",
    "correct",
    "true",
    "maybe",
    "anatomy",
    "A",
]
INTS = [0, 1, 2, 3, 4, -1, 5, 23999, 24000, 2**31 - 1, -(2**31), 2**62]
FLOATS = [0.0, 1.0, 0.5, -1.0, 2.0, math.nan, math.inf, -math.inf, 1e300, 3.0]


def random_message(cls, rng: random.Random, depth: int = 0):
    """A message of type ``cls`` with some fields set to values near and past every boundary."""
    message = cls()
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue
        repeated = field.is_repeated
        values = [_value(field, rng, depth) for _ in range(rng.randint(0, 4) if repeated else 1)]
        values = [v for v in values if v is not None]
        if not values:
            continue
        target = getattr(message, field.name) if repeated or field.type == FieldDescriptor.TYPE_MESSAGE else None
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for value in values:
                (target.add() if repeated else target).CopyFrom(value)
        elif repeated:
            target.extend(values)
        else:
            setattr(message, field.name, values[0])
    return message


def _value(field: FieldDescriptor, rng: random.Random, depth: int):
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return random_message(field.message_type._concrete_class, rng, depth + 1) if depth < 3 else None
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(STRINGS)
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99])
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(FLOATS)
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 16))
    value = rng.choice(INTS)
    unsigned = kind in (
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
    )
    small = kind in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_SFIXED32,
    )
    value = abs(value) if unsigned else value
    return max(min(value, 2**31 - 1), -(2**31)) if small else value


def mutated(body: bytes, rng: random.Random) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(data) + 1)
        action = rng.randrange(4)
        if action == 0 and data:
            data[min(where, len(data) - 1)] = rng.randrange(256)
        elif action == 1:
            data[where:where] = rng.randbytes(rng.randint(1, 8))
        elif action == 2:
            del data[where : where + rng.randint(1, 8)]
        else:
            data = data[:where]
    return bytes(data)


def test_fuzz_every_rpc_answers_ok_or_a_precise_status_and_the_server_stays_up(server):
    rng = random.Random(20261127)
    request_types = {
        f"/{s.full_name}/{m.name}": m.input_type._concrete_class
        for s in pb.DESCRIPTOR.services_by_name.values()
        for m in s.methods
    }
    seen: dict[str, set] = {method: set() for method in METHODS}
    stop_at = time.monotonic() + 25
    for round_ in range(60):
        for method in METHODS:
            if time.monotonic() > stop_at:
                break
            message = random_message(request_types[method], rng)
            body = [
                message.SerializeToString(),
                mutated(message.SerializeToString(), rng),
                rng.randbytes(rng.randint(0, 64)),
            ][round_ % 3]
            code, details = raw_status(server, method, body, timeout=10)
            assert code in PRECISE, f"{method} {message} -> {code.name}: {details}"
            seen[method].add(code)
    assert all(seen.values())
    assert server.proc.poll() is None
    with Client(server.address, token="tok-a-at-least-16-chars") as c:
        assert c.hidden_states("tiny-llama", "0shot", layers=0).sizes["layer"] == 1
