"""One damaged run must not break the catalog, and the store opens only what it should (issue 17, point 3).

Real parts only: runs written through the store, damaged on disk the way a bad copy, a stray link or a full
disk leaves them, then read through a real server, the client, ``actstore ls`` and the store itself. Damage
that a folder and a bucket must survive alike (a cut-short or oversized zarr.json, a missing array) is tested
over both in test_storage_conformance.py."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from actstore.cli import main
from actstore.client import ActstoreError, Client
from actstore.server.process import ServerProcess
from actstore.store import Store
from actstore.store import files as files_module
from actstore.store.errors import DamagedRun, LabelNotFound, RefusedEntry, SiteNotFound
from actstore.testing import shard_key, write_synthetic_run

MODEL, HIDDEN, N_LAYERS, N_SAMPLES = "m", 32, 2, 40
GOOD = ("good-a", "good-b")
DAMAGED = ("truncated", "passwd", "no-arrays")
REFUSED = {grpc.StatusCode.DATA_LOSS, grpc.StatusCode.FAILED_PRECONDITION}


def write_run(store: Store, method: str) -> np.ndarray:
    """A small run written through the store (2 shards of 32 samples per layer); its states."""
    return write_synthetic_run(store, MODEL, method, N_LAYERS, N_SAMPLES, HIDDEN, seed=len(method))


def truncate(path: Path) -> None:
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2])


def link(path: Path, target: str | Path) -> None:
    path.unlink()
    path.symlink_to(target)


def shard(root: Path, method: str, layer: int = 0, index: int = 0) -> Path:
    return root / shard_key(MODEL, method, layer, index)


def error_of(call) -> ActstoreError:
    with pytest.raises(ActstoreError) as caught:
        call()
    return caught.value


def stop(server: ServerProcess) -> None:
    """Stop the server; a server whose threads are stuck (as before the fix) is killed."""
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
    server.stop()


@pytest.fixture
def damaged_folder(tmp_path) -> Path:
    """Two good runs beside three damaged ones: a zarr.json cut short, one that is a link to /etc/passwd,
    and a run whose hidden_states array is gone."""
    root = tmp_path / "store"
    store = Store(root)
    for method in GOOD + DAMAGED:
        write_run(store, method)
    truncate(root / MODEL / "truncated" / "zarr.json")
    link(root / MODEL / "passwd" / "zarr.json", "/etc/passwd")
    shutil.rmtree(root / MODEL / "no-arrays" / "hidden_states")
    return root


def test_damaged_runs_beside_good_ones_leave_the_catalog_working_through_a_server(damaged_folder, tmp_path):
    server = ServerProcess(damaged_folder, tmp_path / "server.log")
    try:
        with Client(server.address, retries=0) as client:
            listed = [(r["model"], r["method"]) for r in client.runs()]
            assert listed == [(MODEL, m) for m in GOOD]
            for method in DAMAGED:
                for call in (client.describe, client.labels, functools.partial(client.hidden_states, layers=0)):
                    error = error_of(functools.partial(call, MODEL, method))
                    assert error.code in REFUSED, error
                    assert f"{MODEL}/{method}" in error.message
                    assert "passwd" not in error.message.replace(f"{MODEL}/passwd", "")  # no path of the link
            assert client.hidden_states(MODEL, "good-a", layers=1).shape == (1, N_SAMPLES, HIDDEN)
    finally:
        stop(server)
    assert "root:x:0:0" not in server.output()  # nothing of /etc/passwd was read, not even into a log


def test_ls_and_the_store_list_the_good_runs_and_name_the_damaged(damaged_folder, capsys, caplog):
    assert main(["ls", "--store", str(damaged_folder)]) == 0
    shown = capsys.readouterr()
    assert all(f"{MODEL}/{m}" in shown.out for m in GOOD) and not any(f"{MODEL}/{m} " in shown.out for m in DAMAGED)
    assert all(f"run {MODEL}/{m} " in shown.err and "damaged" in shown.err for m in DAMAGED), shown.err
    store = Store(damaged_folder)
    good, damaged = store.scan()
    assert [r.method for r in good] == list(GOOD)
    assert sorted(str(d).split()[1] for d in damaged) == sorted(f"{MODEL}/{m}" for m in DAMAGED)
    assert store.has_run(MODEL, "truncated")
    with pytest.raises(DamagedRun, match=r"m/no-arrays .*damaged: its array 'hidden_states' is missing"):
        store.run(MODEL, "no-arrays")
    with pytest.raises(DamagedRun, match=r"m/passwd .*its zarr.json is a link leading out of the store's root"):
        store.run(MODEL, "passwd")
    caplog.clear()
    store.runs()
    assert "damaged" not in caplog.text  # logged when found, not again on every listing


def test_a_damaged_run_is_listed_again_once_restored(damaged_folder, tmp_path):
    store = Store(damaged_folder)
    backup = tmp_path / "backup"
    write_run(Store(backup), "no-arrays")
    assert [r.method for r in store.runs()] == list(GOOD)
    shutil.copytree(
        backup / MODEL / "no-arrays" / "hidden_states", damaged_folder / MODEL / "no-arrays" / "hidden_states"
    )
    assert [r.method for r in store.runs()] == sorted([*GOOD, "no-arrays"])


@pytest.fixture
def traps(tmp_path) -> Path:
    """A good run, a run whose zarr.json is a link to /dev/zero, and one whose first shard is a FIFO."""
    root = tmp_path / "store"
    store = Store(root)
    for method in ("good-a", "zero", "fifo"):
        write_run(store, method)
    link(root / MODEL / "zero" / "zarr.json", "/dev/zero")
    fifo = shard(root, "fifo")
    fifo.unlink()
    os.mkfifo(fifo)
    return root


@pytest.fixture
def two_threads(traps, tmp_path):
    """A server with two request threads only: two calls stuck on one damaged run would stall every other."""
    server = ServerProcess(traps, tmp_path / "server.log", "--workers", "2", "--max-streams-per-caller", "64")
    yield server
    stop(server)


def test_a_fifo_shard_blocks_no_thread(two_threads):
    """Before the fix, the reads of the FIFO held both threads for ever: every call then ran out of time."""
    with Client(two_threads.address, timeout=5, stream_timeout=5, retries=0) as client:
        started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            errors = list(pool.map(lambda _: error_of(lambda: client.hidden_states(MODEL, "fifo", layers=0)), range(6)))
        assert {e.code for e in errors} == {grpc.StatusCode.FAILED_PRECONDITION}, errors
        assert all(f"{MODEL}/fifo/hidden_states/c/0/0/0" in e.message and "FIFO" in e.message for e in errors)
        assert [r["method"] for r in client.runs()] == ["fifo", "good-a"]
        assert client.hidden_states(MODEL, "good-a", layers=0).shape == (1, N_SAMPLES, HIDDEN)
        assert client.hidden_states(MODEL, "fifo", layers=1).shape == (1, N_SAMPLES, HIDDEN)  # its other shards
        assert time.monotonic() - started < 10


def test_a_zarr_json_linked_to_dev_zero_costs_nothing(two_threads):
    """Before the fix, listing read /dev/zero without end (~190 MB/s of server memory, past any deadline)."""
    baseline = two_threads.rss_bytes()
    with Client(two_threads.address, timeout=5, retries=0) as client:
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            listings = list(pool.map(lambda _: [r["method"] for r in client.runs()], range(4)))
        assert listings == [["fifo", "good-a"]] * 4
        error = error_of(lambda: client.describe(MODEL, "zero"))
        assert error.code == grpc.StatusCode.DATA_LOSS and f"{MODEL}/zero" in error.message
        assert "zarr.json is a link leading out of the store's root" in error.message
        assert time.monotonic() - started < 5
    assert two_threads.rss_bytes() - baseline < 64 * 2**20


def in_a_thread(call, timeout: float = 5) -> BaseException | None:
    """The error ``call`` raises in a daemon thread, which must finish within ``timeout`` (a blocked open()
    of a FIFO would not: the test fails instead of hanging)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the error is the result
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"still blocked after {timeout} s"
    return outcome[0]


@pytest.mark.parametrize("by_fd", [True, False], ids=["proc-fd", "realpath"])
def test_every_reader_refuses_a_fifo_without_blocking(traps, monkeypatch, by_fd):
    """The fast reader, zarr-python and xarray all go through the same checks (also where no /proc/self/fd
    tells what a descriptor opened)."""
    monkeypatch.setattr(files_module, "_BY_FD", by_fd and files_module._BY_FD)
    run = Store(traps).run(MODEL, "fifo")
    for call in (
        lambda: run.read_states([0]),
        lambda: run.hidden_states[0, :3],
        lambda: run.to_xarray().hidden_states[0].values,
    ):
        error = in_a_thread(call)
        assert isinstance(error, RefusedEntry) and "m/fifo/hidden_states/c/0/0/0" in str(error), error
    assert run.read_states([1]).shape == (1, N_SAMPLES, HIDDEN)  # the other layer's shards read as before


@pytest.mark.parametrize("by_fd", [True, False], ids=["proc-fd", "realpath"])
def test_links_out_of_the_root_are_refused_and_links_inside_it_followed(tmp_path, monkeypatch, by_fd):
    """A link as the file itself, or as a folder on its path; a link that stays inside the root is followed."""
    monkeypatch.setattr(files_module, "_BY_FD", by_fd and files_module._BY_FD)
    root, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store = Store(root)
    states = write_run(store, "good-a")
    write_run(store, "out")
    elsewhere.mkdir()
    # a shard file, and the folder of another layer's shards, moved out of the root and linked back
    shutil.move(shard(root, "out"), elsewhere / "shard")
    shard(root, "out").symlink_to(elsewhere / "shard")
    shutil.move(shard(root, "out", layer=1).parent.parent, elsewhere / "layer1")
    shard(root, "out", layer=1).parent.parent.symlink_to(elsewhere / "layer1")
    # inside the root: a shard moved to another folder of the store and linked from its place
    shutil.move(shard(root, "good-a"), root / "kept-shard")
    shard(root, "good-a").symlink_to(root / "kept-shard")

    run = Store(root).run(MODEL, "out")
    for layer in (0, 1):
        with pytest.raises(
            RefusedEntry,
            match=rf"m/out/hidden_states/c/{layer}/0/0 in store .* is a link leading "
            r"out of the store's root",
        ):
            run.read_states([layer], 0, 8)
        with pytest.raises(RefusedEntry):
            run.hidden_states[layer, :8]
    assert np.array_equal(Store(root).run(MODEL, "good-a").read_states([0, 1]), states)


def test_the_errors_travel_from_dask_workers_and_map_to_their_statuses():
    """Analyses run on Dask workers, which send errors back pickled; the job then fails with status_of's code."""
    import pickle

    from actstore.server.errors import status_of

    refused = RefusedEntry("m/x/hidden_states/c/0/0/0", "/data/store", "a FIFO, not a regular file")
    damaged = DamagedRun("run m/x in store /data/store is damaged: ...", access={"visibility": "private"})
    no_site = SiteNotFound("m/x", "mlp_out", ["resid_pre"])
    no_label = LabelNotFound("m/x", "colour", ["topic"])
    for error, code in (
        (refused, grpc.StatusCode.FAILED_PRECONDITION),
        (damaged, grpc.StatusCode.DATA_LOSS),
        (no_site, grpc.StatusCode.INVALID_ARGUMENT),  # as when the service's own checks find them
        (no_label, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and status_of(copy) == code
    assert pickle.loads(pickle.dumps(damaged)).access == {"visibility": "private"}


def test_a_failed_first_ingest_keeps_a_damaged_run_it_cannot_read(tmp_path):
    """A failed job removes the store it created only if no run holds samples; a damaged run's samples
    cannot be counted, so it is kept, and the job's own error is what the caller sees."""
    root = tmp_path / "store"
    store = Store(root)
    with pytest.raises(RuntimeError, match="the job failed"), store.writing():
        write_run(store, "truncated")
        truncate(root / MODEL / "truncated" / "zarr.json")
        raise RuntimeError("the job failed")
    assert shard(root, "truncated").is_file()
    assert store.has_run(MODEL, "truncated")


def test_a_damaged_private_run_is_hidden_from_outsiders_like_an_absent_one(tmp_path):
    """DATA_LOSS would tell another group that the private run exists: it gets NOT_FOUND, worded as for a
    run that is not there; the owner group learns the run is damaged."""
    root = tmp_path / "store"
    store = Store(root)
    write_run(store, "private")
    store.set_access(MODEL, "private", {"owner_group": "lab-a", "visibility": "private", "shared_with": []})
    shutil.rmtree(root / MODEL / "private" / "hidden_states")
    (tmp_path / "auth.toml").write_text(
        '[tokens]\n"tok-a-at-least-16-chars" = "lab-a"\n"tok-b-at-least-16-chars" = "lab-b"\n'
    )
    server = ServerProcess(root, tmp_path / "server.log", "--auth", str(tmp_path / "auth.toml"))
    try:
        with Client(server.address, token="tok-b-at-least-16-chars", retries=0) as outsider:
            hidden = error_of(functools.partial(outsider.describe, MODEL, "private"))
            absent = error_of(functools.partial(outsider.describe, MODEL, "never-written"))
        assert hidden.code == absent.code == grpc.StatusCode.NOT_FOUND
        assert hidden.message.replace("private", "X") == absent.message.replace("never-written", "X")
        with Client(server.address, token="tok-a-at-least-16-chars", retries=0) as owner:
            assert error_of(functools.partial(owner.describe, MODEL, "private")).code == grpc.StatusCode.DATA_LOSS
    finally:
        stop(server)
