"""actstore.torch: a run's rows as PyTorch datasets, each row once per epoch across workers and ranks,
seeded and resumable, at one snapshot, failing loudly on corrupt bytes and dead workers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from actstore.client import ActstoreError, Client
from actstore.server.process import ServerProcess
from actstore.store import CorruptData, LabelNotFound, Store
from actstore.store.capture import CaptureLayout
from actstore.testing import read_object, shard_key, write_object, write_synthetic_capture, write_synthetic_run
from actstore.torch import RunChanged, activations, rows
from actstore.torch.order import delivered

MODEL, METHOD, SITE = "tiny", "0shot", "resid"
N_TEXTS, HIDDEN, LAYERS = 60, 8, 2


def text_lengths() -> np.ndarray:
    return np.random.default_rng(1).integers(5, 30, size=N_TEXTS)


def write_capture(root, texts: range = range(N_TEXTS)) -> None:
    """A per-token run whose states say where they are: [row, layer, sample, position, noise...]."""
    lengths = text_lengths()
    capture = CaptureLayout(rows="token", n_layers=LAYERS, hidden=HIDDEN, sites={SITE: HIDDEN}, labels={"topic": "str"})
    store = Store(root)
    before = store.run(MODEL, METHOD).n_samples if store.has_run(MODEL, METHOD) else 0
    with store.begin_run(MODEL, METHOD, recipe={"synthetic": 1}) as writer:
        writer.start(provenance={}, capture=capture, planned=N_TEXTS)
        for batch in np.array_split(np.asarray(texts), 3):
            n = lengths[batch]
            sample = np.repeat(batch, n)
            position = np.concatenate([np.arange(k) for k in n])
            row = before + np.arange(len(sample))
            before += len(sample)
            states = np.random.default_rng(int(batch[0])).standard_normal((LAYERS, len(sample), HIDDEN)).astype("f4")
            for layer in range(LAYERS):
                states[layer, :, :4] = np.stack([row, np.full_like(row, layer), sample, position], axis=1)
            topic = np.array([f"topic{s % 3}" for s in sample], dtype=object)
            writer.add({SITE: states}, {"sample": sample, "position": position, "token_id": position, "topic": topic})
            writer.commit()


@pytest.fixture
def store(tmp_path):
    write_capture(tmp_path / "store")
    return tmp_path / "store"


SCRIPT_IMPORTS = (
    "import os, signal, sys, time\nfrom torch.utils.data import DataLoader\nfrom actstore.torch import activations"
)


def feed_script(path: Path, main: str) -> list[str]:
    """A training job's script at ``path``, ``main`` the body of its ``__main__`` block (a DataLoader's workers
    import the script): the command that runs it."""
    path.write_text(f"{SCRIPT_IMPORTS}\n\nif __name__ == '__main__':\n{textwrap.indent(textwrap.dedent(main), '    ')}")
    return [sys.executable, str(path)]


OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def n_rows(store) -> int:
    return Store(store).run(MODEL, METHOD).n_samples


def seen_rows(loader) -> list[int]:
    found = []
    for batch in loader:
        states = batch["states"]
        assert torch.equal(states[..., 2].long(), batch["sample"]) and torch.equal(
            states[..., 3].long(), batch["position"]
        )
        found += states[..., 0].long().reshape(-1).tolist()
    return found


@pytest.mark.parametrize("batch_size", [None, 50])
def test_every_row_once_per_epoch_across_two_workers_and_two_ranks(store, batch_size):
    n = n_rows(store)
    loader_batch = 16 if batch_size is None else None
    found = []
    for rank in (0, 1):
        ds = activations(
            store,
            MODEL,
            METHOD,
            SITE,
            1,
            batch_size=batch_size,
            buffer_size=100,
            block_rows=40,
            rank=rank,
            world_size=2,
        )
        mine = seen_rows(DataLoader(ds, batch_size=loader_batch, num_workers=2))
        assert mine, f"rank {rank} read nothing"
        found += mine
    assert sorted(found) == list(range(n))
    assert found != sorted(found), "shuffled, yet read in order"


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_kept_past_their_window_keep_their_rows(store, shuffle):
    """Windows' memory is reused, within an epoch and in the next; a sequential pass yields views of a window,
    so a batch a trainer keeps must keep its window's memory from being filled again."""
    ds = activations(store, MODEL, METHOD, SITE, 1, shuffle=shuffle, batch_size=30, buffer_size=64, block_rows=32)
    kept = list(DataLoader(ds, batch_size=None))  # every batch of the epoch, held to its end (~20 windows)
    ds.set_epoch(1)
    for batch in DataLoader(ds, batch_size=None):  # the next epoch, in buffers the first's left free or not
        del batch
    found = seen_rows(kept)  # each batch's states still carry its own rows' sample and position
    assert sorted(found) == list(range(n_rows(store))) and (found == sorted(found)) != shuffle


def test_the_states_are_the_stored_ones_with_their_coordinates_and_labels(store):
    run = Store(store).run(MODEL, METHOD)
    ds = activations(store, MODEL, METHOD, None, [0, 1], labels=["topic"], batch_size=37, buffer_size=64, block_rows=32)
    stored = run.read_states([0, 1], 0, run.n_samples, SITE)
    labels = run.labels()
    for batch in DataLoader(ds, batch_size=None):
        row = batch["states"][:, 0, 0].long().numpy()
        assert batch["states"].shape[1:] == (2, HIDDEN) and batch["states"].dtype == torch.float32
        np.testing.assert_array_equal(batch["states"].numpy(), stored[:, row].transpose(1, 0, 2))
        np.testing.assert_array_equal(batch["sample"].numpy(), labels["sample"][row])
        np.testing.assert_array_equal(np.asarray(ds.categories["topic"])[batch["topic"].numpy()], labels["topic"][row])
    assert ds.categories["topic"] == ["topic0", "topic1", "topic2"]


def test_ranks_of_a_real_process_group_read_disjoint_shares_covering_the_run(store, tmp_path):
    """Two processes in a gloo group, each with 2 DataLoader workers: the dataset takes its rank from
    torch.distributed, and the group sees every row once."""
    script = tmp_path / "rank.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            import torch.distributed as dist
            from torch.utils.data import DataLoader
            from actstore.torch import activations

            if __name__ == "__main__":
                rank = int(sys.argv[1])
                dist.init_process_group("gloo", init_method={(tmp_path / "rendezvous").as_uri()!r}, rank=rank,
                                        world_size=2)
                ds = activations({str(store)!r}, {MODEL!r}, {METHOD!r}, {SITE!r}, 1, batch_size=30,
                                 buffer_size=100, block_rows=40)
                mine = [int(row) for batch in DataLoader(ds, batch_size=None, num_workers=2)
                        for row in batch["states"][:, 0]]
                every = [None, None]
                dist.all_gather_object(every, mine)
                if rank == 0:
                    print(json.dumps(every))
                dist.destroy_process_group()
            """
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(rank)], stdout=subprocess.PIPE, text=True, env=env)
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0]
    first, second = json.loads(outputs[0])
    assert first and second, "a rank read nothing"
    assert not set(first) & set(second)
    assert sorted(first + second) == list(range(n_rows(store)))


def test_items_without_batch_size_are_single_rows(store):
    item = next(iter(activations(store, MODEL, METHOD, SITE, 0, shuffle=False)))
    assert item["states"].shape == (HIDDEN,) and int(item["sample"]) == 0 and int(item["position"]) == 0


def test_a_seed_and_epoch_fix_the_order_and_another_changes_it(store):
    def order(**kw):
        return seen_rows(
            activations(store, MODEL, METHOD, SITE, 0, batch_size=64, buffer_size=200, block_rows=32, **kw)
        )

    assert order(seed=3) == order(seed=3)
    assert order(seed=3) != order(seed=4)
    assert order(seed=3, epoch=1) != order(seed=3)
    assert order(shuffle=False) == list(range(n_rows(store)))


def test_a_shuffled_batch_mixes_rows_from_across_the_run(store):
    ds = activations(store, MODEL, METHOD, SITE, 0, batch_size=64, buffer_size=256, block_rows=32)
    first = next(iter(ds))["sample"]
    assert len(set(first.tolist())) > 10  # rows of one text are contiguous on disk; a batch takes many texts


def test_start_k_with_workers_continues_with_batch_k_plus_one(store):
    def stream(start=0):
        ds = activations(
            store, MODEL, METHOD, SITE, 0, batch_size=30, buffer_size=90, block_rows=20, start=start, seed=5
        )
        return [b["states"][:, 0].long().tolist() for b in DataLoader(ds, batch_size=None, num_workers=2)]

    whole = stream()
    for k in (1, 4, 7, len(whole) - 1):
        assert stream(k) == whole[k:], k


def test_a_training_job_killed_at_batch_k_resumes_with_batch_k_plus_one(store, tmp_path):
    command = feed_script(
        tmp_path / "train.py",
        f"""
        start = int(sys.argv[1])
        ds = activations({str(store)!r}, {MODEL!r}, {METHOD!r}, {SITE!r}, 1, batch_size=25, buffer_size=60,
                         block_rows=20, seed=11, start=start)
        for k, batch in enumerate(DataLoader(ds, batch_size=None, num_workers=2), start=start + 1):
            print(k, *batch["states"][:, 0].long().tolist(), flush=True)
        """,
    )

    def lines(start: int) -> list[str]:
        done = subprocess.run([*command, str(start)], capture_output=True, text=True, env=OFFLINE)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    whole = lines(0)
    killed = subprocess.Popen([*command, "0"], stdout=subprocess.PIPE, text=True, env=OFFLINE)
    got = [killed.stdout.readline() for _ in range(5)]
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert [line.strip() for line in got] == whole[:5]
    assert lines(5) == whole[5:]


def test_delivered_follows_the_dataloaders_turns():
    assert delivered([3, 1], 3) == ([2, 1], 0)
    assert delivered([5, 5, 2], 9) == ([4, 3, 2], 1)
    assert delivered([3, 3, 3], 4) == ([2, 1, 1], 1)
    assert delivered([2, 2], 0) == ([0, 0], 0)
    with pytest.raises(ValueError, match="has 4 batches"):
        delivered([2, 2], 5)


def test_rows_appended_after_the_dataset_was_made_are_not_read(tmp_path):
    root = tmp_path / "store"
    write_capture(root, range(40))
    ds = activations(root, MODEL, METHOD, SITE, 0, batch_size=32, block_rows=16)
    before = n_rows(root)
    write_capture(root, range(40, N_TEXTS))  # appended while the dataset exists, before its workers start
    assert n_rows(root) > before
    assert sorted(seen_rows(DataLoader(ds, batch_size=None, num_workers=2))) == list(range(before))


def test_a_run_replaced_since_is_refused(tmp_path):
    root = tmp_path / "store"
    write_synthetic_run(Store(root), MODEL, METHOD, n_samples=50, hidden=HIDDEN)
    ds = activations(root, MODEL, METHOD, None, 0, batch_size=8)
    run_dir = root / MODEL / METHOD
    subprocess.run(["rm", "-r", str(run_dir)], check=True)
    write_synthetic_run(Store(root), MODEL, METHOD, n_samples=50, hidden=HIDDEN, seed=1)
    with pytest.raises(RunChanged, match="was replaced since this dataset was made"):
        list(DataLoader(ds, batch_size=None, num_workers=1))


def test_a_corrupted_chunk_raises_corruption_naming_run_layer_and_samples(store):
    key = shard_key(MODEL, METHOD, 1, 1).replace("hidden_states", SITE)
    data = bytearray(read_object(Store(store), key))
    data[40] ^= 0xFF
    write_object(Store(store), key, bytes(data))
    ds = activations(store, MODEL, METHOD, SITE, 1, batch_size=16, block_rows=16)
    with pytest.raises(CorruptData, match=rf"corrupt data in run {MODEL}/{METHOD}, layer 1, samples \d+:\d+"):
        list(DataLoader(ds, batch_size=None, num_workers=2))
    assert seen_rows(activations(store, MODEL, METHOD, SITE, 0, batch_size=64)), "layer 0 still reads"


def test_a_killed_worker_ends_the_iteration_with_an_error_not_a_hang(store, tmp_path):
    # In a process of its own: torch's SIGCHLD handler raises again, at any later bytecode, while the killed
    # worker's pid is still registered; in pytest's process that lands in a later test or in pytest itself.
    command = feed_script(
        tmp_path / "kill_worker.py",
        f"""
        ds = activations({str(store)!r}, {MODEL!r}, {METHOD!r}, {SITE!r}, 0, batch_size=1, block_rows=8, buffer_size=8)
        iterator = iter(DataLoader(ds, batch_size=None, num_workers=2, prefetch_factor=1))
        next(iterator)
        os.kill(iterator._workers[0].pid, signal.SIGKILL)
        started = time.monotonic()
        try:
            for _ in iterator:
                pass
        except RuntimeError as error:
            print(round(time.monotonic() - started), error, flush=True)
        """,
    )
    done = subprocess.run(command, capture_output=True, text=True, env=OFFLINE, timeout=120)
    assert done.stdout, f"the iteration ended without an error: {done.stderr}"
    seconds, message = done.stdout.split(" ", 1)
    assert re.search("DataLoader worker .* exited unexpectedly|killed by signal", message), done.stdout + done.stderr
    assert int(seconds) < 60


def test_bad_arguments_are_refused_in_one_line(store):
    with pytest.raises(IndexError, match=r"layers \[5\] outside 0..1"):
        activations(store, MODEL, METHOD, SITE, 5)
    with pytest.raises(KeyError, match="^run .* has no site 'nope'; its sites: "):  # unquoted, unlike KeyError's
        activations(store, MODEL, METHOD, "nope", 0)
    with pytest.raises(LabelNotFound, match="^run .* has no label 'colour'; its labels: .*topic"):
        activations(store, MODEL, METHOD, SITE, 0, labels=["colour"])
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        activations(store, MODEL, METHOD, SITE, 0, batch_size=0)
    with pytest.raises(ValueError, match="cannot start after batch 1000"):
        next(iter(activations(store, MODEL, METHOD, SITE, 0, batch_size=100, start=1000)))


def test_a_question_run_gives_its_samples_and_text_labels(tmp_path):
    root = tmp_path / "store"
    labels = {
        "sample": np.arange(40) * 3,
        "subject": np.array(["bio", "law"] * 20, dtype=object),
        "answer": np.array(list("ABCD") * 10, dtype=object),
        "prediction": np.array(list("ABCD") * 10, dtype=object),
        "correct": np.ones(40, dtype=bool),
    }
    states = write_synthetic_run(Store(root), MODEL, METHOD, n_samples=40, hidden=HIDDEN, labels=labels)
    ds = rows(root, MODEL, METHOD, layer=2, labels=["subject", "correct"])
    assert len(ds) == 40 and ds.categories["subject"] == ["bio", "law"]
    batch = next(iter(DataLoader(ds, batch_size=40, shuffle=True)))
    order = batch["sample"].numpy() // 3
    np.testing.assert_array_equal(batch["states"].numpy(), states[2, order])
    assert (batch["subject"].numpy() == order % 2).all() and batch["correct"].all() and (batch["position"] == -1).all()
    with pytest.raises(IndexError, match="row 40 outside the 40 rows"):
        ds[40]


@pytest.fixture
def feed_server(store, tmp_path):
    with ServerProcess(store, tmp_path / "server.log") as server:
        yield server


def test_reading_through_a_server_gives_the_local_stream(store, feed_server):
    """Shuffled with the same blocks, and in stored order with each side's defaults (this run fits in one
    block either way: the served rows and coordinates are checked, not the block size)."""
    shuffled = dict(batch_size=40, buffer_size=100, block_rows=32, seed=2, labels=["topic"])
    for kw in (shuffled, dict(batch_size=40, shuffle=False, labels=["topic"])):
        local = list(activations(store, MODEL, METHOD, SITE, [0, 1], **kw))
        with Client(feed_server.address) as client:
            remote = list(activations(client, MODEL, METHOD, SITE, [0, 1], **kw))
        assert len(local) == len(remote)
        for a, b in zip(local, remote):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with Client(feed_server.address) as client:
        with pytest.raises(LabelNotFound, match="^run .* has no label 'colour'; its labels: .*topic"):
            activations(client, MODEL, METHOD, SITE, 0, labels=["colour"])
        ds = activations(client, MODEL, METHOD, SITE, 0, batch_size=40, block_rows=32)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn", timeout=120)
    assert sorted(seen_rows(loader)) == list(range(n_rows(store)))  # each worker opens its own connection


def test_map_style_rows_through_a_server_equal_the_stores(store, feed_server, tmp_path):
    """Any rows, repeated or out of order, in one call per batch; a question run's rows by sample id."""
    picked = [17, 3, 3, n_rows(store) - 1, 0, 250]
    write_synthetic_run(Store(store), MODEL, "questions", n_samples=40, hidden=HIDDEN)
    with Client(feed_server.address) as client:
        for method, site, layer, batch in ((METHOD, SITE, [0, 1], picked), ("questions", None, 1, [39, 5, 5, 0])):
            local = rows(store, MODEL, method, site, layer, labels=["topic"] if site else ())
            remote = rows(client, MODEL, method, site, layer, labels=["topic"] if site else ())
            got, want = remote.__getitems__(batch), local.__getitems__(batch)
            assert len(remote) == len(local) and len(got) == len(batch)
            for a, b in zip(got, want):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        loader = DataLoader(rows(client, MODEL, METHOD, SITE, 1), batch_size=64, shuffle=True)
        assert sorted(int(s) for batch in loader for s in batch["states"][:, 0]) == list(range(n_rows(store)))
        with pytest.raises(IndexError, match="outside"):
            rows(client, MODEL, METHOD, SITE, 0)[n_rows(store)]
        with pytest.raises(ActstoreError, match="row\\(s\\) outside"):
            client.hidden_states(MODEL, METHOD, site=SITE, rows=[0, n_rows(store)])


@pytest.mark.parametrize("stored", ["float16", "float32"])
def test_states_come_in_the_dtype_asked_for_holding_the_stored_values(tmp_path, stored):
    capture = CaptureLayout(rows="token", n_layers=1, hidden=HIDDEN, sites={SITE: HIDDEN}, store_dtype=stored)
    write_synthetic_capture(Store(tmp_path), MODEL, METHOD, capture, np.full(20, 30), commits=2)
    run = Store(tmp_path).run(MODEL, METHOD)
    values = torch.from_numpy(run.read_states([0], site=SITE)[0])
    labels = run.labels()
    row_of = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(labels["sample"], labels["position"]))}
    for dtype in (torch.float32, None, torch.bfloat16, torch.float16):
        for shuffle in (True, False):
            ds = activations(tmp_path, MODEL, METHOD, SITE, 0, shuffle, batch_size=64, buffer_size=256, dtype=dtype)
            batches = list(ds)
            got = torch.cat([b["states"] for b in batches])
            rows = [row_of[int(s), int(p)] for b in batches for s, p in zip(b["sample"], b["position"])]
            assert got.dtype == (values.dtype if dtype is None else dtype), (dtype, shuffle)
            assert torch.equal(got, values[rows].to(got.dtype)), (dtype, shuffle)


def test_several_runs_read_as_one_with_each_rows_run(tmp_path):
    for method in ("0shot", "5shot"):
        write_synthetic_run(Store(tmp_path), MODEL, method, n_samples=30 if method == "0shot" else 45, hidden=HIDDEN)
    ds = activations(tmp_path, MODEL, ["0shot", "5shot"], None, 1, batch_size=16, block_rows=8, buffer_size=24)
    assert ds.n_rows == 75 and len(ds.runs) == 2 and "5shot" in ds.runs[1]
    seen = [
        (int(run), int(sample))
        for b in DataLoader(ds, batch_size=None, num_workers=2)
        for run, sample in zip(b["run"], b["sample"])
    ]
    assert sorted(seen) == [(0, s) for s in range(30)] + [(1, s) for s in range(45)]


def test_workers_forked_after_the_main_process_read_still_read(store):
    """Thread pools copied into a forked worker have no threads: reads there would wait forever."""
    ds = activations(store, MODEL, METHOD, SITE, 0, batch_size=64, block_rows=16, buffer_size=64)
    assert seen_rows(ds)  # the main process reads first: its pools have threads now
    loader = DataLoader(ds, batch_size=None, num_workers=2, timeout=60, multiprocessing_context="fork")
    assert sorted(seen_rows(loader)) == list(range(n_rows(store)))


def test_a_folder_and_a_bucket_feed_alike_and_check_every_chunk(any_store):
    write_capture(any_store.url)
    ds = activations(any_store, MODEL, METHOD, SITE, 1, batch_size=50, block_rows=32, buffer_size=64)
    assert sorted(seen_rows(DataLoader(ds, batch_size=None, num_workers=2, timeout=120))) == list(range(ds.n_rows))
    key = shard_key(MODEL, METHOD, 1, 0).replace("hidden_states", SITE)
    data = bytearray(read_object(any_store, key))
    data[100] ^= 0x01
    write_object(any_store, key, bytes(data))
    with pytest.raises(CorruptData, match=rf"run {MODEL}/{METHOD}, layer 1"):
        list(DataLoader(ds, batch_size=None, num_workers=2, timeout=120))


def test_states_read_into_a_given_array_equal_a_fresh_read(store):
    run = Store(store).run(MODEL, METHOD)
    out = np.empty((2, 50, HIDDEN), dtype=np.float32)
    assert run.read_states([0, 1], 10, 60, SITE, out=out) is out
    np.testing.assert_array_equal(out, run.read_states([0, 1], 10, 60, SITE))
    with pytest.raises(ValueError, match="out is float64"):
        run.read_states([0, 1], 10, 60, SITE, out=np.empty((2, 50, HIDDEN)))
