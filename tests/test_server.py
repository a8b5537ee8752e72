"""A real server in a subprocess, a real client: slices, auth, errors, limits, health, reflection, TLS."""

from __future__ import annotations

import datetime
import inspect
import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import xarray as xr
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from actstore.cli import main
from actstore.client import ActstoreError, Client
from actstore.server.process import ServerProcess
from actstore.store import Store

TOKENS = {"tok-a-at-least-16-chars": "lab-a", "tok-b-at-least-16-chars": "lab-b", "tok-c-at-least-16-chars": "lab-c"}
BIG = ("synthetic", "big")  # 2 layers x 24,000 samples x 1024: 98 MB per layer, far above 4 MiB messages


def write_big_run(root) -> np.ndarray:
    """A run written straight through the store: large layers without running a model."""
    rng = np.random.default_rng(0)
    store = Store(root)
    with store.writer(
        *BIG, recipe={"synthetic": 1}, attrs={"access": {"visibility": "public"}}, n_layers=2, hidden=1024
    ) as writer:
        for start in range(0, 24000, 4000):
            n = 4000
            writer.add(
                rng.standard_normal((2, n, 1024), dtype=np.float32),
                {
                    "sample": np.arange(start, start + n),
                    "subject": np.array(["s"] * n, dtype=object),
                    "answer": np.array(["A"] * n, dtype=object),
                    "prediction": np.array(["B"] * n, dtype=object),
                    "correct": np.zeros(n, dtype=bool),
                },
            )
    return store.run(*BIG).hidden_states[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, questions_file):
    root = tmp_path_factory.mktemp("served")
    store = root / "store"
    common = [
        "ingest",
        "--store",
        str(store),
        "--model",
        str(tiny_model),
        "--dataset",
        str(questions_file),
        "--dtype",
        "float32",
    ]
    assert main([*common, "--methods", "0shot", "--group", "lab-a"]) == 0  # private
    assert (
        main([*common, "--methods", "1shot", "--group", "lab-a", "--visibility", "shared", "--share-with", "lab-b"])
        == 0
    )
    assert main([*common, "--methods", "2shot", "--group", "lab-c", "--visibility", "public"]) == 0
    assert main([*common, "--methods", "0shot", "--name", "other-model", "--group", "lab-b"]) == 0
    big_layer = write_big_run(store)
    auth = root / "auth.toml"
    auth.write_text("[tokens]\n" + "".join(f'"{t}" = "{g}"\n' for t, g in TOKENS.items()))
    server = ServerProcess(store, root / "server.log", "--auth", str(auth), "--max-response-mb", "150")
    yield server, store, big_layer
    server.stop()


def client(server, token="tok-a-at-least-16-chars", **kwargs) -> Client:
    return Client(server.address, token=token, **kwargs)


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(ActstoreError) as caught:
        call()
    return caught.value.code


SELECTIONS = [
    ({}, (slice(None), slice(None), slice(None))),
    ({"layers": 2}, ([2], slice(None), slice(None))),
    ({"layers": [3, 0]}, ([3, 0], slice(None), slice(None))),
    ({"layers": range(1, 3)}, (slice(1, 3), slice(None), slice(None))),
    ({"samples": slice(4, 9)}, (slice(None), slice(4, 9), slice(None))),
    ({"hidden": slice(5, 17), "layers": [1]}, ([1], slice(None), slice(5, 17))),
]


@pytest.mark.parametrize("kwargs,index", SELECTIONS)
def test_slices_equal_plain_zarr(served, kwargs, index):
    server, store, _ = served
    expected = Store(store).run("tiny-llama", "0shot").hidden_states[:]
    layers, samples, cols = index
    expected = expected[layers][:, samples][:, :, cols]
    with client(server) as c:
        got = c.hidden_states("tiny-llama", "0shot", **kwargs)
    np.testing.assert_array_equal(got.values, expected)
    assert got.dims == ("layer", "sample", "hidden")


def test_ids_and_label_filters_select_the_right_samples(served):
    server, store, _ = served
    run = Store(store).run("tiny-llama", "1shot")
    states, labels = run.hidden_states[:], run.labels()
    with client(server, token="tok-b-at-least-16-chars") as c:
        ids = [int(labels["sample"][i]) for i in (9, 2, 17)]
        got = c.hidden_states("tiny-llama", "1shot", samples=ids, layers=[0, 3])
        np.testing.assert_array_equal(got.values, states[[0, 3]][:, [9, 2, 17]])
        assert got.sample.values.tolist() == ids
        got = c.hidden_states("tiny-llama", "1shot", subject="astronomy", answer=["A", "C"])
        keep = (labels["subject"] == "astronomy") & np.isin(labels["answer"], ["A", "C"])
        np.testing.assert_array_equal(got.values, states[:, keep])
        assert set(got.subject.values) == {"astronomy"} and set(got.answer.values) <= {"A", "C"}
        only = c.labels("tiny-llama", "1shot", subject="anatomy")
        assert (only.subject.values == "anatomy").all() and only.sizes["sample"] == (
            labels["subject"] == "anatomy"
        ).sum()


def test_stored_chunks_are_forwarded_exactly_including_partial_edges(served):
    server, store, _ = served
    run = Store(store).run(*BIG)
    with client(server) as c:
        got = c.hidden_states(*BIG, layers=[1, 0], samples=slice(5, 9003))  # edges inside inner chunks
    np.testing.assert_array_equal(got.values, run.hidden_states[[1, 0], 5:9003])
    assert got.sample.values[0] == 5 and got.sizes["sample"] == 8998


def test_float16_only_when_lossless_or_allowed(served):
    server, store, _ = served
    expected = Store(store).run("tiny-llama", "0shot").hidden_states[1]
    with client(server) as c:  # fp32-computed states do not fit float16 exactly
        assert (
            status_of(lambda: c.hidden_states("tiny-llama", "0shot", layers=1, dtype="float16"))
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        lossy = c.hidden_states("tiny-llama", "0shot", layers=1, dtype="float16", allow_lossy=True)
    assert lossy.dtype == np.float16
    np.testing.assert_array_equal(lossy.values[0], expected.astype(np.float16))


def test_auth_matrix(served):
    server, _, _ = served
    S = grpc.StatusCode
    with Client(server.address) as anonymous:
        assert status_of(anonymous.runs) == S.UNAUTHENTICATED
    with client(server, token="wrong") as c:
        assert status_of(lambda: c.describe("tiny-llama", "2shot")) == S.UNAUTHENTICATED
    with client(server, token="tok-b-at-least-16-chars") as b:
        visible = {(r["model"], r["method"]) for r in b.runs()}
        assert visible == {("tiny-llama", "1shot"), ("tiny-llama", "2shot"), ("other-model", "0shot"), BIG}
        assert status_of(lambda: b.hidden_states("tiny-llama", "0shot", layers=0)) == S.NOT_FOUND  # as if absent
        assert status_of(lambda: b.describe("tiny-llama", "0shot")) == S.NOT_FOUND
        assert b.hidden_states("tiny-llama", "1shot", layers=0).sizes["sample"] > 0  # shared with lab-b
        assert status_of(lambda: b.set_visibility("tiny-llama", "1shot", "public")) == S.PERMISSION_DENIED
    with client(server, token="tok-c-at-least-16-chars") as c:
        assert {(r["model"], r["method"]) for r in c.runs()} == {("tiny-llama", "2shot"), BIG}
        assert status_of(lambda: c.labels("tiny-llama", "1shot")) == S.NOT_FOUND
    # the owner opens its private run to everyone, then closes it
    with client(server, token="tok-a-at-least-16-chars") as a:
        assert a.set_visibility("tiny-llama", "0shot", "public")["visibility"] == "public"
        with client(server, token="tok-c-at-least-16-chars") as c:
            assert c.labels("tiny-llama", "0shot").sizes["sample"] > 0
        a.set_visibility("tiny-llama", "0shot", "private")
        with client(server, token="tok-c-at-least-16-chars") as c:
            assert status_of(lambda: c.labels("tiny-llama", "0shot")) == S.NOT_FOUND
    assert not any(token in server.output() for token in TOKENS)


BAD_REQUESTS = [
    (lambda c: c.describe("no-such-model", "0shot"), grpc.StatusCode.NOT_FOUND, "no run"),
    (lambda c: c.hidden_states("tiny-llama", "0shot", layers=[9]), grpc.StatusCode.NOT_FOUND, "no layer 9"),
    (lambda c: c.hidden_states("tiny-llama", "0shot", samples=[10**9]), grpc.StatusCode.NOT_FOUND, "not in this run"),
    (
        lambda c: c.hidden_states("tiny-llama", "0shot", layers=range(3, 9)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "layer range",
    ),
    (lambda c: c.hidden_states("tiny-llama", "0shot", samples=slice(5, 5)), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (
        lambda c: c.hidden_states("tiny-llama", "0shot", subject="alchemy"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "matches no sample",
    ),
    (lambda c: c.hidden_states("tiny-llama", "0shot", mood="happy"), grpc.StatusCode.INVALID_ARGUMENT, "unknown label"),
    (
        lambda c: c.hidden_states("tiny-llama", "0shot", hidden=slice(0, 999)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden range",
    ),
    (lambda c: c.describe("../etc", "0shot"), grpc.StatusCode.INVALID_ARGUMENT, "invalid model name"),
    (lambda c: c.hidden_states(*BIG), grpc.StatusCode.RESOURCE_EXHAUSTED, "cap of 150 MiB"),
]


@pytest.mark.parametrize("call,code,message", BAD_REQUESTS)
def test_bad_requests_get_precise_statuses_and_the_server_keeps_serving(served, call, code, message):
    server, _, _ = served
    with client(server) as c:
        with pytest.raises(ActstoreError) as caught:
            call(c)
        assert caught.value.code == code and message in caught.value.message
        assert c.hidden_states("tiny-llama", "2shot", layers=0).sizes["layer"] == 1


def test_a_layer_far_above_4_mib_streams_in_bounded_memory(served):
    server, _, big_layer = served
    baseline = server.rss_bytes()
    peak = baseline
    with client(server) as c:
        done = threading.Event()
        result = {}
        thread = threading.Thread(target=lambda: (result.update(x=c.hidden_states(*BIG, layers=0)), done.set()))
        thread.start()
        while not done.wait(0.02):
            peak = max(peak, server.rss_bytes())
        thread.join()
    np.testing.assert_array_equal(result["x"].values[0], big_layer)
    assert big_layer.nbytes > 90 * 2**20
    assert peak - baseline < 48 * 2**20, f"server grew by {(peak - baseline) / 2**20:.0f} MiB"


def test_a_cancelled_stream_stops_server_work(served):
    server, _, _ = served
    from actstore.v1 import actstore_pb2 as pb
    from actstore.v1 import actstore_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        stream = pb_grpc.DataServiceStub(channel).ReadStates(
            pb.ReadStatesRequest(run=pb.RunRef(model=BIG[0], method=BIG[1]), layers=[0]),
            metadata=(("authorization", "Bearer tok-a-at-least-16-chars"),),
        )
        next(stream), next(stream)
        stream.cancel()
    deadline = time.monotonic() + 10
    while "cancelled by the client" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(text for text in server.output().splitlines() if "cancelled by the client" in text)
    sent, total = [int(w) for w in line.split() if w.isdigit()][:2]
    assert sent < total / 4


def test_a_passed_deadline_stops_server_work(served):
    server, _, _ = served
    before = server.output().count("cancelled by the client")
    with client(server, stream_timeout=0.05, retries=0) as c:
        assert status_of(lambda: c.hidden_states(*BIG, layers=0)) == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while server.output().count("cancelled by the client") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.output().count("cancelled by the client") == before + 1


def test_health_and_reflection(served):
    server, _, _ = served
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "actstore.v1.CatalogService", "actstore.v1.DataService"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"actstore.v1.CatalogService", "actstore.v1.DataService", "grpc.health.v1.Health"} <= names


def test_client_retries_while_the_server_starts(tmp_path, served):
    _, store, _ = served
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    found = {}
    with Client(f"127.0.0.1:{port}", retry_for=60) as c:  # a server start takes seconds on a busy machine
        thread = threading.Thread(target=lambda: found.update(runs=c.runs()))
        thread.start()
        time.sleep(0.3)
        late = ServerProcess(store, tmp_path / "late.log", address=f"127.0.0.1:{port}")
        thread.join(timeout=60)
        late.stop()
    assert len(found["runs"]) == 5  # open access: every run


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls(served, tmp_path):
    _, store, _ = served
    cert, key = _self_signed(tmp_path)
    server = ServerProcess(store, tmp_path / "tls.log", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        address = f"localhost:{server.port}"
        with Client(address, tls=cert) as c:
            assert c.hidden_states("tiny-llama", "2shot", layers=0).sizes["layer"] == 1
        with Client(address, retries=0) as plain:
            assert status_of(plain.runs) == grpc.StatusCode.UNAVAILABLE
        assert "with TLS" in server.output()
    finally:
        server.stop()


def test_open_access_is_said_and_sigterm_finishes_streams(served, tmp_path):
    _, store, big_layer = served
    server = ServerProcess(store, tmp_path / "open.log")
    assert "open access" in server.output()
    with Client(server.address) as c, grpc.insecure_channel(server.address) as channel:
        result = {}
        thread = threading.Thread(target=lambda: result.update(x=c.hidden_states(*BIG, layers=1)))
        thread.start()
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        health = health_pb2_grpc.HealthStub(channel)
        try:
            status = health.Check(health_pb2.HealthCheckRequest()).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError as exc:  # already refusing new calls
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
        thread.join(timeout=60)
    assert server.wait() == 0
    assert result["x"].shape[1] == 24000  # the in-flight stream finished
    assert "shutting down" in server.output()


def test_query_cli(served, tmp_path, capsys, monkeypatch):
    server, store, _ = served
    monkeypatch.setenv("ACTSTORE_TOKEN", "tok-a-at-least-16-chars")
    out = tmp_path / "s.npy"
    assert (
        main(
            [
                "query",
                "--address",
                server.address,
                "get",
                "tiny-llama",
                "0shot",
                "--layers",
                "1:3",
                "--subject",
                "anatomy",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    run = Store(store).run("tiny-llama", "0shot")
    keep = run.labels()["subject"] == "anatomy"
    np.testing.assert_array_equal(np.load(out), run.hidden_states[1:3][:, keep])
    nc = tmp_path / "s.nc"  # a saved file says what made its numbers: the run's recipe (site included)
    assert (
        main(["query", "--address", server.address, "get", "tiny-llama", "0shot", "--layers", "1", "--out", str(nc)])
        == 0
    )
    saved = xr.open_dataset(nc)
    assert json.loads(saved.attrs["recipe"]) == run.attrs["recipe"] and json.loads(saved.attrs["recipe"])["site"]
    assert json.loads(saved.attrs["run_attributes"])["model_id"] == "tiny-llama"
    saved.close()
    assert main(["query", "--address", server.address, "runs"]) == 0
    assert "tiny-llama/0shot" in capsys.readouterr().out
    assert main(["query", "--address", server.address, "describe", "tiny-llama", "9shot"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


# -- a shared service that no caller can stall, starve or fool --------------------------------------------


def _refusal(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ActstoreError) as caught:
        call()
    return caught.value.code, caught.value.message


def test_a_hidden_run_is_answered_exactly_like_an_absent_one(served):
    server, _, _ = served
    with client(server, token="tok-c-at-least-16-chars") as c:  # lab-c may not see lab-a's private 0shot
        for call in (c.describe, c.labels, lambda *run: c.hidden_states(*run, layers=0)):
            hidden = _refusal(lambda: call("tiny-llama", "0shot"))
            absent = _refusal(lambda: call("tiny-llama", "7shot"))
            assert hidden[0] == absent[0] == grpc.StatusCode.NOT_FOUND
            assert hidden[1].replace("0shot", "?") == absent[1].replace("7shot", "?")


@pytest.mark.parametrize(
    "call",
    [
        lambda c, long: c.describe(long, "0shot"),
        lambda c, long: c.hidden_states("tiny-llama", long, layers=0),
        lambda c, long: c.labels("tiny-llama", "0shot", **{long: "x"}),  # an unknown label's name
    ],
    ids=["model", "method", "label"],
)
def test_errors_never_echo_unbounded_input(served, call):
    server, _, _ = served
    with client(server) as c:
        code, message = _refusal(lambda: call(c, "x" * 20_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) < 400 and "xxxx" in message


def test_a_filter_value_that_is_not_a_label_value_is_refused(served):
    server, store, _ = served
    correct = Store(store).run("tiny-llama", "2shot").labels()["correct"]
    with client(server) as c:
        code, message = _refusal(lambda: c.labels("tiny-llama", "2shot", correct="maybe"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "true or false" in message
        for value in (True, False):
            assert c.labels("tiny-llama", "2shot", correct=value).sizes["sample"] == (correct == value).sum()


@pytest.mark.parametrize("token", ["", "short-token"])
def test_short_tokens_are_refused_at_start(served, tmp_path, token):
    _, store, _ = served
    auth = tmp_path / "auth.toml"
    auth.write_text(f'[tokens]\n"{token}" = "lab-a"\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "actstore",
            "serve",
            "--store",
            str(store),
            "--auth",
            str(auth),
            "--address",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "fewer than 16" in done.stderr and "Traceback" not in done.stderr
    assert not token or token not in done.stderr


def test_calls_have_a_deadline_by_default(served, tmp_path):
    _, store, _ = served
    assert inspect.signature(Client).parameters["timeout"].default is not None
    assert inspect.signature(Client).parameters["stream_timeout"].default is not None
    server = ServerProcess(store, tmp_path / "stopped.log")
    try:
        with Client(server.address) as c:
            c.runs()  # connected
            server.proc.send_signal(signal.SIGSTOP)  # alive, listening, answering nothing
            with Client(server.address, timeout=1, stream_timeout=1) as stalled:
                started = time.monotonic()
                assert status_of(stalled.runs) == grpc.StatusCode.DEADLINE_EXCEEDED
                assert (
                    status_of(lambda: stalled.hidden_states("tiny-llama", "2shot")) == grpc.StatusCode.DEADLINE_EXCEEDED
                )
                assert time.monotonic() - started < 10
            with Client(server.address, stream_timeout=None, retries=0) as patient:  # no deadline: keepalive
                started = time.monotonic()
                assert status_of(lambda: patient.hidden_states("tiny-llama", "2shot")) == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 45
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


def test_the_client_rides_over_a_server_restart(served, tmp_path):
    _, store, _ = served
    first = ServerProcess(store, tmp_path / "first.log")
    address = first.address
    with Client(address, retry_for=60) as c:  # the window covers a slow start on a busy machine
        assert len(c.runs()) == 5
        first.stop()
        found = {}
        thread = threading.Thread(target=lambda: found.update(runs=c.runs()))
        thread.start()
        time.sleep(2)  # down for 2 s, plus the ~3 s a server takes to start here
        second = ServerProcess(store, tmp_path / "second.log", address=address)
        try:
            thread.join(timeout=30)
        finally:
            second.stop()
    assert len(found["runs"]) == 5
