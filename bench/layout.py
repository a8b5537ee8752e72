"""Storage layout benchmark: why hidden_states is sharded the way it is.

    .venv/bin/python bench/layout.py [--store PATH] [--samples 9181]

Takes real states (a SmolLM2 0-shot run, ingested here on 200 questions unless --store names a
store holding one), tiles them to the study's 9,181 samples, writes them under several chunk
layouts and prints, side by side: one whole layer (MB/s) and one sample across all layers (p50 ms),
each read through zarr-python and through actstore's reader, and the size against raw fp16.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from actstore.store import Store  # noqa: E402
from actstore.store.layout import StateLayout, state_compressor  # noqa: E402
from actstore.store.reader import StateReader  # noqa: E402


def real_states(store: Path | None, tmp: Path) -> np.ndarray:
    if store is None:
        from actstore.ingest.options import IngestOptions
        from actstore.ingest.pipeline import Ingest

        store = tmp / "store"
        ingest = Ingest(IngestOptions(store=store, limit=200))
        ingest.run(next(ingest.plans()))
    run = next(r for r in Store(store).runs() if r.method == "0shot")
    return run.hidden_states[:]


def measure(path: Path, states: np.ndarray, chunks: tuple, shards: tuple | None) -> list[float]:
    array = zarr.create_array(path, shape=states.shape, dtype="float32", chunks=chunks, shards=shards,
                              compressors=[state_compressor()], dimension_names=("layer", "sample", "hidden"))
    array[:] = states
    array = zarr.open_array(path, mode="r")
    reader = StateReader(array, path)
    n_layers, n, _ = states.shape
    picks = [int(i) for i in np.random.default_rng(0).integers(0, n, 60)]
    assert np.array_equal(reader.read(list(range(n_layers)), picks[0], picks[0] + 1), states[:, picks[0]:picks[0] + 1])
    figures = []
    for read_layer, read_sample in [
        (lambda: array[n_layers // 2], lambda i: array[:, i]),
        (lambda: reader.read([n_layers // 2], 0, n), lambda i: reader.read(list(range(n_layers)), i, i + 1)),
    ]:
        layer_s = min(_timed(read_layer) for _ in range(5))
        sample_s = np.median([_timed(lambda: read_sample(i)) for i in picks])
        figures += [states[0].nbytes / layer_s / 1e6, sample_s * 1e3]
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return [*figures, states.size * 2 / size]


def _timed(read) -> float:
    started = time.perf_counter()
    read()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="a store with a SmolLM2 0shot run (default: ingest one)")
    parser.add_argument("--samples", type=int, default=9181)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = real_states(args.store, Path(tmp))
        reps = -(-args.samples // base.shape[1])
        states = np.concatenate([base] * reps, axis=1)[:, : args.samples]
        hidden = states.shape[2]
        chosen = StateLayout(hidden)
        layouts = {
            f"chosen: shards of {chosen.shard_samples}, inner chunks of {chosen.inner_samples}":
                (chosen.chunks, chosen.shards),
            "shards of 2048, inner chunks of 64": ((1, 64, hidden), (1, 2048, hidden)),
            "plain chunks of 512 samples": ((1, 512, hidden), None),
            "plain chunks of 64 samples": ((1, 64, hidden), None),
            "plain chunks of 2048 samples": ((1, 2048, hidden), None),
        }
        print(f"states {states.shape} float32 (bf16-valued), {states[0].nbytes / 1e6:.1f} MB per layer")
        print(f"{'':48} {'zarr-python':^25} {'actstore reader':^25}")
        print(f"{'layout':48} {'layer MB/s':>10} {'sample p50 ms':>14} {'layer MB/s':>10} {'sample p50 ms':>14} "
              f"{'vs raw fp16':>12}")
        for i, (name, (chunks, shards)) in enumerate(layouts.items()):
            z_mbps, z_p50, r_mbps, r_p50, ratio = measure(Path(tmp) / f"layout{i}", states, chunks, shards)
            print(f"{name:48} {z_mbps:>10.0f} {z_p50:>14.2f} {r_mbps:>10.0f} {r_p50:>14.2f} {ratio:>11.2f}x")


if __name__ == "__main__":
    main()
