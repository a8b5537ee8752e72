"""The command line behaves as users of command lines expect: versions, one-line errors with a non-zero
exit, no silent overwrite, default port, and a server that refuses a busy or bad address."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actstore import __version__
from actstore.address import parse_address
from actstore.cli import main
from actstore.server.process import ServerProcess
from actstore.store import Store


@pytest.fixture
def store(tmp_path):
    """A one-run store written straight through the store API: no model needed."""
    labels = {
        "sample": np.arange(4),
        "subject": np.array(["a"] * 4, dtype=object),
        "answer": np.array(["A"] * 4, dtype=object),
        "prediction": np.array(["B"] * 4, dtype=object),
        "correct": np.zeros(4, dtype=bool),
    }
    store = Store(tmp_path / "store")
    with store.writer("m", "0shot", recipe={"r": 1}, attrs={}, n_layers=2, hidden=8) as writer:
        writer.add(np.ones((2, 4, 8), dtype=np.float32), labels)
    return Path(store.url)


def actstore(*args: str) -> subprocess.CompletedProcess:
    """``actstore ARGS`` in a subprocess; a server that starts when it should not is caught by the timeout."""
    return subprocess.run([sys.executable, "-m", "actstore", *args], capture_output=True, text=True, timeout=60)


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]  # gRPC's C core may log a line of its own before it
    assert last.startswith("actstore: error:") and all(w in last for w in words), done.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"actstore {__version__}"


def test_ls_of_a_missing_store_fails_in_one_line(tmp_path, capsys):
    assert main(["ls", "--store", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"actstore: error: no actstore store at {tmp_path / 'nowhere'}"
    assert not (tmp_path / "nowhere").exists()


def test_query_get_does_not_overwrite_unless_asked(store, tmp_path, capsys):
    out = tmp_path / "states.npy"
    out.write_bytes(b"precious")
    server = ServerProcess(store, tmp_path / "server.log")
    try:
        get = ["query", "--address", server.address, "get", "m", "0shot", "--out", str(out)]
        assert main(get) == 1
        assert "exists" in capsys.readouterr().err and out.read_bytes() == b"precious"
        assert main([*get, "--overwrite"]) == 0
        np.testing.assert_array_equal(np.load(out), np.ones((2, 4, 8), dtype=np.float32))
    finally:
        server.stop()


@pytest.mark.parametrize(
    "given,meant",
    [
        ("localhost", "localhost:50051"),
        ("10.0.0.7", "10.0.0.7:50051"),
        ("[::1]", "[::1]:50051"),
        ("example.org:443", "example.org:443"),
    ],
)
def test_an_address_without_a_port_means_50051(given, meant):
    assert parse_address(given) == meant


def test_a_second_server_on_a_busy_port_refuses_to_start(store, tmp_path):
    first = ServerProcess(store, tmp_path / "first.log")
    try:
        assert_one_line_error(
            actstore("serve", "--store", str(store), "--address", first.address), "cannot listen on", first.address
        )
        first_line = first.output().splitlines()[0]  # timestamped, with its level
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", first_line), first_line
    finally:
        first.stop()


@pytest.mark.parametrize(
    "address,words",
    [
        ("127.0.0.1:99999", ["invalid port"]),
        ("no such host", ["invalid address"]),
        ("nonsense", ["cannot listen on nonsense:50051"]),
    ],
)
def test_a_bad_address_fails_in_one_line(store, address, words):
    assert_one_line_error(actstore("serve", "--store", str(store), "--address", address), *words)


@pytest.mark.parametrize("problem", ["missing", "a folder", "not PEM"])
def test_bad_tls_files_fail_in_one_line(store, tmp_path, problem):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    if problem == "a folder":
        cert.mkdir()
        key.mkdir()
    elif problem == "not PEM":
        cert.write_text("not a certificate")
        key.write_text("not a key")
    assert_one_line_error(
        actstore(
            "serve", "--store", str(store), "--address", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)
        ),
        "TLS" if problem != "not PEM" else "--tls-cert",
    )
