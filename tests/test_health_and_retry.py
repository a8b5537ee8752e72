"""Health answers precisely (garbage: INVALID_ARGUMENT; draining after SIGTERM: NOT_SERVING), and the
client's window for riding over a server restart is settable from Python, the shell and the environment.
Real servers in subprocesses, real sockets."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actstore.cli import main
from actstore.client import ActstoreError, Client
from actstore.server.process import ServerProcess
from actstore.store import Store
from actstore.testing import write_synthetic_run
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc

RUN = ("synthetic", "health")
GARBAGE = b"\xff" * 64  # a varint that never ends: no protobuf message


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("health") / "store"
    write_synthetic_run(Store(root), *RUN, n_layers=2, n_samples=4000, hidden=576)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_call(address: str, method: str, body: bytes) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary(method, request_serializer=None, response_deserializer=None)(body, timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def health_status(address: str) -> health_pb2.HealthCheckResponse.ServingStatus:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_garbage_to_health_check_is_an_invalid_argument_and_a_good_check_still_serves(store, tmp_path):
    with ServerProcess(store, tmp_path / "server.log") as server:
        code, details = raw_call(server.address, "/grpc.health.v1.Health/Check", GARBAGE)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)  # was UNKNOWN
        assert "not a valid Check request" in details
        assert raw_call(server.address, "/grpc.health.v1.Health/Check", b"")[0] == grpc.StatusCode.OK
        assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING


def test_after_sigterm_health_answers_not_serving_while_a_stream_drains(store, tmp_path):
    with ServerProcess(store, tmp_path / "drain.log") as server:
        with grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            stream = pb_grpc.DataServiceStub(channel).ReadStates(  # in flight, unread: holds the drain open
                pb.ReadStatesRequest(run=pb.RunRef(model=RUN[0], method=RUN[1])), timeout=60
            )
            next(stream)
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while "shutting down" not in server.output() and time.monotonic() < deadline:
                time.sleep(0.05)
            status, deadline = health_status(server.address), time.monotonic() + 5  # was UNAVAILABLE
            while status != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
                status = health_status(server.address)  # the flip follows the log line by microseconds
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with Client(server.address, retries=0) as late:
                with pytest.raises(ActstoreError) as refused:
                    late.runs()
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.message
            received = sum(len(m.chunk.data) for m in [next(stream), *stream])  # the in-flight stream finishes
        assert received > 0 and server.wait() == 0


def test_the_retry_window_is_settable_from_the_shell_and_a_server_started_after_10_s_is_reached(store, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    query = subprocess.Popen(
        [sys.executable, "-m", "actstore", "query", "--address", address, "--retry-for", "60", "runs"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(12)  # longer than the default window of 10 s
        assert query.poll() is None, query.communicate()[0]
        with ServerProcess(store, tmp_path / "late.log", address=address):
            output = query.communicate(timeout=60)[0]
    finally:
        query.kill()
    assert query.returncode == 0, output
    assert "synthetic/health" in output


def test_a_spent_retry_window_says_what_happened_and_how_to_wait_longer(monkeypatch, capsys):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with Client(address, retry_for=1) as client:
        with pytest.raises(ActstoreError) as spent:
            client.runs()
    assert time.monotonic() - started < 5
    assert spent.value.code == grpc.StatusCode.UNAVAILABLE
    assert "still unavailable after retrying for 1 s" in spent.value.message
    assert "retry_for=SECONDS" in spent.value.message and "--retry-for" in spent.value.message
    monkeypatch.setenv("ACTSTORE_RETRY_FOR", "0.5")
    started = time.monotonic()
    assert main(["query", "--address", address, "runs"]) == 1
    assert time.monotonic() - started < 4  # the environment's window, not the default 10 s
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ACTSTORE_RETRY_FOR" in err
    monkeypatch.setenv("ACTSTORE_RETRY_FOR", "soon")
    assert main(["query", "--address", address, "runs"]) == 1
    assert "ACTSTORE_RETRY_FOR: expected a number of seconds" in capsys.readouterr().err
