"""Storage layout benchmark: why hidden_states is sharded the way it is.

    .venv/bin/python bench/layout.py [--store PATH] [--samples 9181] [--pairs 300] [--checksums-only]

Takes real states (a SmolLM2 0-shot run, ingested here on 200 questions unless --store names a
store holding one), tiles them to the study's 9,181 samples, writes them under several chunk
layouts (each with the store's codecs: Blosc, then a CRC-32C per chunk) and prints, side by side: one
whole layer (MB/s) and one sample across all layers (p50 ms), each read through zarr-python and through
actstore's reader, and the size against raw fp16. Then the cost of the checksums: the chosen layout with
chunk CRCs and a shard record (what runs are written with) and without either, read by actstore's reader in
back-to-back pairs (see checksum_cost).
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
from actstore.store.folder import Folder  # noqa: E402
from actstore.store.layout import StateLayout, state_compressor, state_compressors  # noqa: E402
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


def write(
    path: Path, states: np.ndarray, chunks: tuple, shards: tuple | None, compressors: list
) -> tuple[zarr.Array, StateReader]:
    """``states`` stored at ``path`` under one layout, opened for reading both ways."""
    array = zarr.create_array(
        path,
        shape=states.shape,
        dtype="float32",
        chunks=chunks,
        shards=shards,
        compressors=compressors,
        dimension_names=("layer", "sample", "hidden"),
    )
    array[:] = states
    array = zarr.open_array(path, mode="r")
    return array, StateReader(array, Folder(path.parent), path.name)


def speeds(array: zarr.Array, reader: StateReader, states: np.ndarray) -> list[float]:
    """Layer MB/s (best of 5) and one-sample p50 ms (60 samples), through zarr-python then actstore's reader."""
    n_layers, n, _ = states.shape
    picks = [int(i) for i in np.random.default_rng(0).integers(0, n, 60)]
    assert np.array_equal(
        reader.read(list(range(n_layers)), picks[0], picks[0] + 1), states[:, picks[0] : picks[0] + 1]
    )
    figures = []
    for read_layer, read_sample in [
        (lambda: array[n_layers // 2], lambda i: array[:, i]),
        (lambda: reader.read([n_layers // 2], 0, n), lambda i: reader.read(list(range(n_layers)), i, i + 1)),
    ]:
        layer_s = min(_timed(read_layer) for _ in range(5))
        sample_s = np.median([_timed(lambda: read_sample(i)) for i in picks])
        figures += [states[0].nbytes / layer_s / 1e6, sample_s * 1e3]
    return figures


def size_ratio(path: Path, states: np.ndarray) -> float:
    """Raw fp16 bytes over the bytes on disk."""
    return states.size * 2 / sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checksum_cost(tmp: Path, states: np.ndarray, layout: StateLayout, pairs: int) -> dict[str, list[float]]:
    """Time with chunk checksums and the shard record (checked against every shard's index, see
    StateReader.record) over time without either, through actstore's reader: a whole layer (read again, as
    a server does, and read first by a new reader, as an analysis does), and one sample across all layers,
    in ``pairs`` pairs of reads. A pair's two reads run back to back, in alternating order, so neither the
    machine's drift nor the warmer caches of the second read favour one side.
    Returns the quartiles (25, 50, 75 %) of each read's ratios, and the sizes on disk (with / without)."""
    readers = [
        write(tmp / name, states, layout.chunks, layout.shards, compressors)[1]
        for name, compressors in (("with", state_compressors()), ("without", [state_compressor()]))
    ]
    readers[0] = recorded(readers[0])
    n_layers, n, _ = states.shape
    reads = {
        "layer": lambda reader, i: reader.read([n_layers // 2], 0, n),
        "layer, first read": lambda reader, i: fresh(reader).read([n_layers // 2], 0, n),
        "sample": lambda reader, i: reader.read(list(range(n_layers)), i, i + 1),
    }
    ratios: dict[str, list[float]] = {name: [] for name in reads}
    for pair in range(pairs):
        sample = pair * 7919 % n
        for name, read in reads.items():
            order = readers if pair % 2 == 0 else readers[::-1]
            first, second = (_timed(lambda: read(reader, sample)) for reader in order)
            ratios[name].append(first / second if pair % 2 == 0 else second / first)
    quartiles = {name: np.percentile(r, [25, 50, 75]).tolist() for name, r in ratios.items()}
    return {**quartiles, "size": [size_ratio(tmp / "without", states) / size_ratio(tmp / "with", states)]}


def recorded(reader: StateReader) -> StateReader:
    """A reader of the same array that checks every shard against its shard record, as runs are read."""
    return StateReader(reader.array, reader.location, reader.key, reader.record(None))


def fresh(reader: StateReader) -> StateReader:
    """A new reader of the same array (with the same shard record), which has read nothing yet."""
    return StateReader(reader.array, reader.location, reader.key, reader.shard_record)


def _timed(read) -> float:
    started = time.perf_counter()
    read()
    return time.perf_counter() - started


def layout_table(tmp: Path, states: np.ndarray, chosen: StateLayout) -> None:
    """Print each layout's read speeds through zarr-python and actstore's reader, and its size."""
    hidden = states.shape[2]
    layouts = {
        f"chosen: shards of {chosen.shard_samples}, inner chunks of {chosen.inner_samples}": (
            chosen.chunks,
            chosen.shards,
        ),
        "shards of 2048, inner chunks of 64": ((1, 64, hidden), (1, 2048, hidden)),
        "plain chunks of 512 samples": ((1, 512, hidden), None),
        "plain chunks of 64 samples": ((1, 64, hidden), None),
        "plain chunks of 2048 samples": ((1, 2048, hidden), None),
    }
    print(f"{'':48} {'zarr-python':^25} {'actstore reader':^25}")
    print(
        f"{'layout':48} {'layer MB/s':>10} {'sample p50 ms':>14} {'layer MB/s':>10} {'sample p50 ms':>14} "
        f"{'vs raw fp16':>12}"
    )
    for i, (name, (chunks, shards)) in enumerate(layouts.items()):
        path = tmp / f"layout{i}"
        z_mbps, z_p50, r_mbps, r_p50 = speeds(*write(path, states, chunks, shards, state_compressors()), states)
        ratio = size_ratio(path, states)
        print(f"{name:48} {z_mbps:>10.0f} {z_p50:>14.2f} {r_mbps:>10.0f} {r_p50:>14.2f} {ratio:>11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="a store with a SmolLM2 0shot run (default: ingest one)")
    parser.add_argument("--samples", type=int, default=9181)
    parser.add_argument("--pairs", type=int, default=300, help="paired reads in the checksum comparison")
    parser.add_argument("--checksums-only", action="store_true", help="skip the table of layouts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = real_states(args.store, Path(tmp))
        reps = -(-args.samples // base.shape[1])
        states = np.concatenate([base] * reps, axis=1)[:, : args.samples]
        chosen = StateLayout(states.shape[2])
        print(f"states {states.shape} float32 (bf16-valued), {states[0].nbytes / 1e6:.1f} MB per layer")
        if not args.checksums_only:
            layout_table(Path(tmp), states, chosen)
        cost = checksum_cost(Path(tmp) / "checksums", states, chosen, args.pairs)
        print(
            f"chosen layout, time with / without chunk CRC-32C and shard record in actstore's reader, median "
            f"(quartiles) of "
            f"{args.pairs} paired reads:"
        )
        for name in ("layer", "layer, first read", "sample"):
            low, median, high = cost[name]
            print(f"  {name:18} {median:.3f}x ({low:.3f}-{high:.3f})")
        print(f"  size on disk, with / without: {cost['size'][0]:.4f}x")


if __name__ == "__main__":
    main()
