"""Serving benchmark: a whole layer and single samples through gRPC vs read locally, in one run.

    .venv/bin/python bench/serve.py [--store PATH] [--samples 9181] [--repeats 7] [--fetches 300]

Builds a run of the study's shape from real SmolLM2 states (31 layers x 9,181 samples x 576; 200
ingested questions tiled, unless --store names a store with a SmolLM2 0shot run), starts
`actstore serve` on a free local port and prints, side by side: one layer's MB/s through the client
against local reads (zarr-python, and actstore's direct reader), and one-sample fetch latency.
Targets: layer through the client >= 0.85x the local read; one sample p50 < 5 ms.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from actstore.client import Client  # noqa: E402
from actstore.server.process import ServerProcess  # noqa: E402
from actstore.store import Store  # noqa: E402

MODEL, METHOD = "bench", "tiled"


def build_run(source: Path | None, root: Path, n_samples: int) -> None:
    if source is None:
        from actstore.ingest.options import IngestOptions
        from actstore.ingest.pipeline import Ingest

        source = root / "source"
        ingest = Ingest(IngestOptions(store=source, limit=200))
        ingest.run(next(ingest.plans()))
    base = next(r for r in Store(source).runs() if r.method == "0shot")
    states, labels = base.hidden_states[:], base.labels()
    n_layers, n_base, hidden = states.shape
    with Store(root / "store").writer(MODEL, METHOD, recipe={"bench": 1}, attrs={}, n_layers=n_layers,
                                      hidden=hidden) as writer:
        for start in range(0, n_samples, n_base):
            n = min(n_base, n_samples - start)
            writer.add(states[:, :n], {**{k: v[:n] for k, v in labels.items()},
                                       "sample": np.arange(start, start + n)})


def median_seconds(read, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="a store with a SmolLM2 0shot run (default: ingest one)")
    parser.add_argument("--samples", type=int, default=9181)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fetches", type=int, default=300, help="one-sample fetches timed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_run(args.store, root, args.samples)
        run = Store(root / "store").run(MODEL, METHOD)
        layer = run.shape[0] // 2
        nbytes = run.shape[1] * run.shape[2] * 4
        server = ServerProcess(root / "store", root / "server.log")
        try:
            with Client(server.address) as client:
                fetched = client.hidden_states(MODEL, METHOD, layers=layer).values[0]
                assert np.array_equal(fetched, run.hidden_states[layer])
                rounds = {"zarr-python": [], "actstore reader": [], "client (gRPC)": []}
                for _ in range(args.repeats):  # interleaved, so machine drift hits all three alike
                    rounds["zarr-python"].append(median_seconds(lambda: run.hidden_states[layer], 1))
                    rounds["actstore reader"].append(median_seconds(lambda: run.read_states([layer]), 1))
                    rounds["client (gRPC)"].append(
                        median_seconds(lambda: client.hidden_states(MODEL, METHOD, layers=layer), 1))
                ids = run.labels()["sample"]
                picks = np.random.default_rng(0).choice(ids, args.fetches)
                latencies = []
                for sample_id in picks:
                    started = time.perf_counter()
                    client.hidden_states(MODEL, METHOD, samples=[int(sample_id)])
                    latencies.append(time.perf_counter() - started)
        finally:
            server.stop()
    mbps = {name: nbytes / np.median(times) / 1e6 for name, times in rounds.items()}
    print(f"run {run.shape} float32; one layer = {nbytes / 1e6:.1f} MB; medians of {args.repeats}")
    for name, value in mbps.items():
        print(f"  layer via {name:16} {value:7.0f} MB/s")
    print(f"client / zarr-python local read:  {mbps['client (gRPC)'] / mbps['zarr-python']:.2f}x  (target >= 0.85)")
    print(f"client / actstore local reader:   {mbps['client (gRPC)'] / mbps['actstore reader']:.2f}x")
    print(f"one sample ({run.shape[0]} layers x {run.shape[2]}) through the client: "
          f"p50 {np.median(latencies) * 1e3:.2f} ms, p99 {np.percentile(latencies, 99) * 1e3:.2f} ms "
          "(target p50 < 5 ms)")


if __name__ == "__main__":
    main()
