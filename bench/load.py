"""Load benchmark: many callers at once, a few of them stalled streams, against one server.

    .venv/bin/python bench/load.py [--seconds 60] [--clients 32] [--stalled 4] [--samples 4000]

Writes a synthetic run (8 layers x --samples x 576, float32), starts `actstore serve` on a free local
port, opens --stalled ReadStates streams of the whole run that read one message and then nothing more,
and runs the other callers (threads spread over a few processes, each with its own Client) for
--seconds: each repeatedly lists runs, reads one sample across all layers, reads 64 samples of one
layer, or reads the labels of 100 random samples. Prints the prompt callers' requests/s, p50/p99
latency, errors, and the server's peak RSS (and its growth over the server's start). Target: no errors,
p99 well under a second.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from actstore.client import ActstoreError, Client  # noqa: E402
from actstore.server.process import ServerProcess  # noqa: E402
from actstore.store import Store  # noqa: E402

MODEL, METHOD = "bench", "load"
N_LAYERS, HIDDEN = 8, 576
MAX_PROCESSES = 4


def build_run(root: Path, n_samples: int) -> Path:
    rng = np.random.default_rng(0)
    store = root / "store"
    with Store(store).writer(
        MODEL, METHOD, recipe={"bench": 1}, attrs={"access": {"visibility": "public"}}, n_layers=N_LAYERS, hidden=HIDDEN
    ) as writer:
        for start in range(0, n_samples, 1000):
            n = min(1000, n_samples - start)
            writer.add(
                rng.standard_normal((N_LAYERS, n, HIDDEN), dtype=np.float32),
                {
                    "sample": np.arange(start, start + n),
                    "subject": rng.choice(["anatomy", "astronomy"], n).astype(object),
                    "answer": rng.choice(list("ABCD"), n).astype(object),
                    "prediction": rng.choice(list("ABCD"), n).astype(object),
                    "correct": rng.random(n) < 0.5,
                },
            )
    return store


def one_request(client: Client, rng: random.Random, n_samples: int) -> None:
    kind = rng.randrange(4)
    if kind == 0:
        client.runs()
    elif kind == 1:
        client.hidden_states(MODEL, METHOD, samples=[rng.randrange(n_samples)])
    elif kind == 2:
        start = rng.randrange(max(1, n_samples - 64))
        client.hidden_states(MODEL, METHOD, layers=rng.randrange(N_LAYERS), samples=slice(start, start + 64))
    else:
        client.labels(MODEL, METHOD, samples=rng.sample(range(n_samples), min(100, n_samples)))


def prompt_callers(
    address: str, threads: int, seconds: float, n_samples: int, seed: int
) -> tuple[list[float], Counter]:
    """``threads`` callers in this process for ``seconds``: their latencies and their errors by status."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def caller(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        mine, failed = [], Counter()
        with Client(address) as client:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    one_request(client, rng, n_samples)
                    mine.append(time.perf_counter() - started)
                except ActstoreError as exc:
                    failed[exc.code.name] += 1
        with lock:
            latencies.extend(mine)
            errors.update(failed)

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return latencies, errors


def stall(address: str, count: int) -> list:
    """``count`` streams of the whole run, each read for one message and then left unread."""
    import grpc

    from actstore.v1 import actstore_pb2 as pb
    from actstore.v1 import actstore_pb2_grpc as pb_grpc

    streams = []
    for _ in range(count):
        channel = grpc.insecure_channel(address)
        stream = pb_grpc.DataServiceStub(channel).ReadStates(
            pb.ReadStatesRequest(run=pb.RunRef(model=MODEL, method=METHOD))
        )
        next(stream)
        streams.append((channel, stream))
    return streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=32, help="callers in all, stalled ones included")
    parser.add_argument("--stalled", type=int, default=4, help="callers that open a stream and stop reading")
    parser.add_argument("--samples", type=int, default=4000, help="samples of the synthetic run")
    args = parser.parse_args()
    stalled = min(args.stalled, args.clients - 1)
    prompt = args.clients - stalled
    processes = min(MAX_PROCESSES, prompt)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = build_run(root, args.samples)
        server = ServerProcess(store, root / "server.log")
        start_rss = server.rss_bytes()
        peak, done = [start_rss], threading.Event()

        def sample_rss() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], server.rss_bytes())

        sampler = threading.Thread(target=sample_rss)
        try:
            sampler.start()
            streams = stall(server.address, stalled)
            shares = [prompt // processes + (i < prompt % processes) for i in range(processes)]
            with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
                results = list(
                    pool.map(
                        prompt_callers,
                        [server.address] * processes,
                        shares,
                        [args.seconds] * processes,
                        [args.samples] * processes,
                        range(processes),
                    )
                )
            for channel, stream in streams:
                stream.cancel()
                channel.close()
        finally:
            done.set()
            sampler.join()
            server.stop()
    latencies = np.array([s for result in results for s in result[0]])
    errors = sum((result[1] for result in results), Counter())
    assert len(latencies), "no request finished"
    print(
        f"{args.clients} clients ({prompt} prompt in {processes} processes, {stalled} stalled streams), "
        f"{args.seconds:g} s, run of {N_LAYERS} layers x {args.samples} samples x {HIDDEN}"
    )
    print(
        f"  prompt callers: {len(latencies) / args.seconds:.0f} requests/s, "
        f"p50 {np.percentile(latencies, 50) * 1e3:.1f} ms, p99 {np.percentile(latencies, 99) * 1e3:.1f} ms, "
        f"max {latencies.max() * 1e3:.0f} ms, errors {sum(errors.values())} {dict(errors) or ''}"
    )
    print(f"  server RSS peak {peak[0] / 2**20:.0f} MiB (+{(peak[0] - start_rss) / 2**20:.0f} MiB over its start)")


if __name__ == "__main__":
    main()
