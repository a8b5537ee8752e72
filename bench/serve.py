"""Serving benchmark: a whole layer and single samples through gRPC vs read locally, in one run.

    .venv/bin/python bench/serve.py [--store PATH] [--samples 9181] [--repeats 7] [--fetches 300]

Builds a run of the study's shape from real SmolLM2 states (31 layers x 9,181 samples x 576; 200
ingested questions tiled, unless --store names a store with a SmolLM2 0shot run), starts
`actstore serve` on a free local port and prints, side by side: one layer's MB/s through the client
against local reads (zarr-python, and actstore's direct reader), and one-sample fetch latency.
Targets: layer through the client >= 0.85x the local read; one sample p50 < 5 ms.

The run is served twice, with and without a CRC-32C per chunk (runs written before chunks carried one).
Every figure is measured on both back to back, in alternating order, and the checksums' cost is the
median of those pairs' ratios, which neither a noisy machine's drift nor the second read's warmer caches
bias.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import zarr

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from actstore.client import Client  # noqa: E402
from actstore.server.process import ServerProcess  # noqa: E402
from actstore.store import Store  # noqa: E402
from actstore.store.layout import state_compressor, state_compressors  # noqa: E402

MODEL = "bench"
VARIANTS = {"with CRC": ("tiled", state_compressors), "without": ("tiled-plain", lambda: [state_compressor()])}


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
    with Store(root / "store").writer(
        MODEL, "tiled", recipe={"bench": 1}, attrs={}, n_layers=n_layers, hidden=hidden
    ) as writer:
        for start in range(0, n_samples, n_base):
            n = min(n_base, n_samples - start)
            writer.add(states[:, :n], {**{k: v[:n] for k, v in labels.items()}, "sample": np.arange(start, start + n)})
    shutil.copytree(root / "store" / MODEL / "tiled", root / "store" / MODEL / "tiled-plain")
    for method, compressors in VARIANTS.values():
        store_with(root / "store", method, compressors())


def store_with(root: Path, method: str, compressors: list) -> None:
    """Store the run's states again under ``compressors``, its chunk grid and attributes unchanged."""
    path = root / MODEL / method / "hidden_states"
    old = zarr.open_array(path, mode="r")
    states = old[:]
    new = zarr.create_array(
        path,
        shape=old.shape,
        dtype=old.dtype,
        chunks=old.chunks,
        shards=old.shards,
        compressors=compressors,
        fill_value=old.fill_value,
        attributes=dict(old.attrs),
        dimension_names=old.metadata.dimension_names,
        overwrite=True,
    )
    new[...] = states
    with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec": the store keeps it anyway
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(root, path=f"{MODEL}/{method}")  # the run's snapshot of its arrays' metadata


def median_seconds(read, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the ratios of paired measurements (taken back to back): steadier than a ratio of medians
    on a machine whose speed drifts."""
    return float(np.median(np.divide(numerators, denominators)))


def alternated(runs: dict, turn: int) -> list:
    """The runs' items, reversed on odd turns: whichever goes second runs on warmer caches."""
    items = list(runs.items())
    return items if turn % 2 == 0 else items[::-1]


READS = {  # one layer, three ways
    "zarr-python": lambda run, client, layer: run.hidden_states[layer],
    "actstore reader": lambda run, client, layer: run.read_states([layer]),
    "client (gRPC)": lambda run, client, layer: client.hidden_states(MODEL, run.method, layers=layer),
}


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
        runs = {variant: Store(root / "store").run(MODEL, method) for variant, (method, _) in VARIANTS.items()}
        run = runs["with CRC"]
        layer = run.shape[0] // 2
        nbytes = run.shape[1] * run.shape[2] * 4
        server = ServerProcess(root / "store", root / "server.log")
        try:
            with Client(server.address) as client:
                for each in runs.values():
                    fetched = client.hidden_states(MODEL, each.method, layers=layer).values[0]
                    assert np.array_equal(fetched, each.hidden_states[layer])
                rounds = {(variant, name): [] for variant in VARIANTS for name in READS}
                for repeat in range(args.repeats):  # interleaved, so machine drift hits every reader and variant alike
                    for name, read in READS.items():
                        for variant, each in alternated(runs, repeat):
                            rounds[variant, name].append(median_seconds(lambda: read(each, client, layer), 1))
                picks = np.random.default_rng(0).choice(run.labels()["sample"], args.fetches)
                latencies = {variant: [] for variant in VARIANTS}
                for i, sample_id in enumerate(picks):
                    for variant, each in alternated(runs, i):
                        started = time.perf_counter()
                        client.hidden_states(MODEL, each.method, samples=[int(sample_id)])
                        latencies[variant].append(time.perf_counter() - started)
        finally:
            server.stop()
    mbps = {key: nbytes / np.median(times) / 1e6 for key, times in rounds.items()}
    p50 = {variant: np.median(times) * 1e3 for variant, times in latencies.items()}
    print(f"run {run.shape} float32; one layer = {nbytes / 1e6:.1f} MB; medians of {args.repeats}")
    print(f"  {'layer via':24} {'with CRC':>10} {'without':>10} {'speed with/without (paired)':>28}")
    for name in READS:
        speed = paired_ratio(rounds["without", name], rounds["with CRC", name])
        print(f"  {name:24} {mbps['with CRC', name]:>5.0f} MB/s {mbps['without', name]:>5.0f} MB/s {speed:>12.3f}x")
    client_mbps = mbps["with CRC", "client (gRPC)"]
    print(f"client / zarr-python local read:  {client_mbps / mbps['with CRC', 'zarr-python']:.2f}x  (target >= 0.85)")
    print(f"client / actstore local reader:   {client_mbps / mbps['with CRC', 'actstore reader']:.2f}x")
    print(
        f"one sample ({run.shape[0]} layers x {run.shape[2]}) through the client: "
        f"p50 {p50['with CRC']:.2f} ms, p99 {np.percentile(latencies['with CRC'], 99) * 1e3:.2f} ms "
        f"(target p50 < 5 ms); without CRC p50 {p50['without']:.2f} ms, "
        f"with/without {paired_ratio(latencies['with CRC'], latencies['without']):.3f}x"
    )


if __name__ == "__main__":
    main()
