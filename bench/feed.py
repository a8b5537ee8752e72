"""Feed benchmark: shuffled batches of one layer's token vectors for training (an SAE, a probe), read with
actstore.torch, against the same vectors in the Arrow cache SAELens writes and reads, side by side.

    .venv/bin/python bench/feed.py [--limit 530] [--repeats 5] [--synthetic-tokens 57344] [--buffer-size 16384]

Three runs of one site and one layer, each with the same N tokens on both sides (a whole number of batches):

- SmolLM2-135M: ``--limit`` MMLU questions as plain text captured at every token (``--positions all``) at
  ``resid_post`` by the capture ingest, computed in float32 and stored losslessly; the middle layer's first N
  tokens are written as a run of their own twice: stored as float16 (the values ``--store-dtype float16``
  stores: the same forward, rounded) and as float32.
- synthetic, d = 4096: standard normal values (numpy's, seed 0) rounded to float16, stored as float16;
  ``--synthetic-tokens`` of them (57,344 fill 0.94 GB of float32 Arrow).

The Arrow side is built from exactly the vectors actstore returns (read back as float32), as SAELens'
CacheActivationsRunner writes its cache: an HF ``datasets`` folder (``save_to_disk``), one row per context of
128 tokens, a column named after the hook of ``Array2D((128, d), "float32")`` and ``token_ids``, rows
shuffled at write time. It is read as SAELens' ActivationsStore reads a cached path: ``load_from_disk``,
``set_format("torch", float32)``, consecutive slices of 32 rows reshaped to (32 * 128, d), through a mixing
buffer (``--buffer-size`` rows permuted with ``torch.randperm``, the first half served as batches, the rest
kept; the remainder served at the end). actstore mixes windows of the same ``--buffer-size`` rows.

Prints, per run: whether the rows each side delivers in a shuffled epoch, as a multiset, equal the layer's
(an exact fingerprint of each row's bits, sorted); then medians of ``--repeats`` timed passes alternating
between the two sides (a pass is as many epochs as make ``--sample-mb`` of float32, at least one):

- shuffled batches of 4,096, tokens/s: actstore (``activations(..., shuffle=True)`` through a DataLoader in
  this process, ``set_epoch`` per epoch) / the Arrow cache read as SAELens does (target: >= 2x); each side
  is opened once (a dataset, the cache, the run), as a trainer does, and its passes timed;
- bytes on disk: the Arrow folder / actstore's shard files of that layer (target: >= 1.5x, stored float16);
- a sequential pass (``shuffle=False``) / the local reader (``read_states`` of the layer a batch at a time,
  made float32) (target: >= 0.8x), and for SmolLM2 in float16 the same through a real server and the client
  (target: >= 0.5x; its shuffled epoch's rows checked too).

The ingest runs in a child process, so that the measuring process starts as a trainer's would. The Arrow
side's speed depends much on the memory allocator (it allocates fresh buffers for every slice, concatenation
and permutation): run with ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=8589934592`` to see it
with glibc keeping freed memory (docs/benchmarks.md, "Feed").
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from actstore.client import Client  # noqa: E402
from actstore.ingest.capture_run import CaptureIngest  # noqa: E402
from actstore.ingest.options import IngestOptions  # noqa: E402
from actstore.ingest.pipeline import DEFAULT_BATCH_SIZE  # noqa: E402
from actstore.server.process import ServerProcess  # noqa: E402
from actstore.store import Store  # noqa: E402
from actstore.store.capture import CaptureLayout  # noqa: E402
from actstore.torch import activations  # noqa: E402

CONTEXT = 128  # tokens per row of the Arrow cache (SAELens' context_size)
PROMPTS = 32  # rows per slice read from it (SAELens' store_batch_size_prompts)
SITE = "resid_post"


@dataclass
class Run:
    """One layer of one site of a run in a store, and its N tokens as float32 (the reference)."""

    label: str
    store: Path
    model: str
    method: str
    layer: int
    states: np.ndarray  # (N, hidden) float32
    token_ids: np.ndarray  # (N,)
    hook: str  # the column's name in the Arrow cache: the model's layer, in TransformerLens' names
    dtype: str  # as stored


# -- the runs ------------------------------------------------------------------------------------------------


def write_layer(store: Path, model: str, method: str, states: np.ndarray, coords: dict[str, np.ndarray], dtype: str):
    """A token run of one site and one layer holding ``states`` (N, hidden), stored as ``dtype``."""
    capture = CaptureLayout(
        rows="token", n_layers=1, hidden=states.shape[1], sites={SITE: states.shape[1]}, store_dtype=dtype
    )
    with Store(store).begin_run(model, method, recipe={"positions": "all", "feed": 1}, overwrite=True) as writer:
        writer.start(provenance={}, capture=capture, planned=len(np.unique(coords["sample"])))
        step = 8192
        for lo in range(0, len(states), step):
            piece = states[lo : lo + step].astype(dtype)[None]
            writer.add({SITE: piece}, {name: values[lo : lo + step] for name, values in coords.items()})
        writer.commit()


def capture_layer(folder: Path, args: argparse.Namespace) -> tuple[str, int, int, int, float]:
    """The capture ingest (run in a process of its own, so that the model and the ingest's memory leave the
    measuring process as a trainer's would be); its middle layer's first N tokens written as runs of their own,
    stored as float16 and as float32. Returns (model, layer, tokens captured, N, seconds)."""
    opts = IngestOptions(
        store=folder / "ingested",
        model=args.model,
        dataset=args.dataset,
        text_column=args.text_column,
        limit=args.limit,
        sites=[SITE],
        positions="all",
        dtype="float32",
        store_dtype="float32",
        batch_size=DEFAULT_BATCH_SIZE,
        overwrite=True,
    )
    ingest = CaptureIngest(opts)
    started = time.perf_counter()
    report = ingest.run(ingest.jobs[0], say=lambda _: None)
    seconds = time.perf_counter() - started
    run = Store(folder / "ingested").runs()[0]
    layer = run.states(SITE).shape[0] // 2
    n = report.rows // args.batch_size * args.batch_size
    if n:
        states = run.read_states([layer], 0, n, SITE)[0]
        labels = run.labels()
        coords = {name: np.asarray(labels[name][:n]) for name in ("sample", "position", "token_id")}
        for dtype in ("float16", "float32"):
            write_layer(folder / "store", run.model, f"layer{layer}-{dtype}", states, coords, dtype)
    shutil.rmtree(folder / "ingested")  # every layer: only the one copied is read from here on
    return run.model, layer, report.rows, n, seconds


def smollm2_runs(folder: Path, args: argparse.Namespace) -> list[Run]:
    """The SmolLM2 runs, stored as float16 and as float32, as captured by ``capture_layer``."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        model, layer, captured, n, seconds = child.submit(capture_layer, folder, args).result()
    if n == 0:
        raise SystemExit(f"{captured} tokens: fewer than one batch of {args.batch_size}; raise --limit")
    print(
        f"SmolLM2: {args.limit} texts, {captured:,} tokens captured at {SITE} in {seconds:.0f} s (float32); "
        f"layer {layer}, first {n:,} tokens ({n // CONTEXT} x {CONTEXT})"
    )
    store = Store(folder / "store")
    exact = store.run(model, f"layer{layer}-float32").read_states([0], site=SITE)[0]
    token_ids = np.asarray(store.run(model, f"layer{layer}-float32").labels()["token_id"])
    runs = []
    for dtype in ("float16", "float32"):
        stored = store.run(model, f"layer{layer}-{dtype}").read_states([0], site=SITE)[0]
        assert np.array_equal(stored, exact.astype(dtype)), f"the {dtype} run holds other values than captured"
        label = f"SmolLM2 d={exact.shape[1]}, {dtype}"
        hook = f"blocks.{layer}.hook_{SITE}"
        runs.append(
            Run(
                label,
                folder / "store",
                model,
                f"layer{layer}-{dtype}",
                0,
                stored.astype(np.float32),
                token_ids,
                hook,
                dtype,
            )
        )
    return runs


def synthetic_run(folder: Path, args: argparse.Namespace) -> Run:
    """``--synthetic-tokens`` rows of standard normal values rounded to float16, d = 4096, stored as float16."""
    n, hidden = args.synthetic_tokens // args.batch_size * args.batch_size, 4096
    rng = np.random.default_rng(0)
    states = np.empty((n, hidden), dtype=np.float16)
    for lo in range(0, n, 8192):
        states[lo : lo + 8192] = rng.standard_normal((min(8192, n - lo), hidden), dtype=np.float32)
    rows = np.arange(n)
    coords = {"sample": rows // CONTEXT, "position": rows % CONTEXT, "token_id": rng.integers(0, 49152, size=n)}
    write_layer(folder / "store", "synthetic-4096", "feed", states, coords, "float16")
    stored = Store(folder / "store").run("synthetic-4096", "feed").read_states([0], site=SITE)[0]
    assert np.array_equal(stored, states)
    return Run(
        "synthetic d=4096, float16",
        folder / "store",
        "synthetic-4096",
        "feed",
        0,
        stored.astype(np.float32),
        coords["token_id"],
        f"blocks.0.hook_{SITE}",
        "float16",
    )


# -- the Arrow cache, as SAELens writes and reads it ---------------------------------------------------------


def write_arrow(path: Path, run: Run, seed: int = 0) -> None:
    """The run's tokens as SAELens' CacheActivationsRunner caches them: one row per context of CONTEXT tokens,
    the hook's column of Array2D float32 and the token ids, rows shuffled, ``save_to_disk``."""
    hidden = run.states.shape[1]
    features = datasets.Features(
        {
            run.hook: datasets.Array2D(shape=(CONTEXT, hidden), dtype="float32"),
            "token_ids": datasets.Sequence(datasets.Value("int32"), length=CONTEXT),
        }
    )
    contexts = run.states.reshape(-1, CONTEXT, hidden)
    tokens = run.token_ids.reshape(-1, CONTEXT).astype(np.int32)
    step = max(1, (256 << 20) // (CONTEXT * hidden * 4))  # contexts per piece: ~256 MB
    pieces = [
        datasets.Dataset.from_dict(
            {run.hook: contexts[lo : lo + step], "token_ids": tokens[lo : lo + step]}, features=features
        )
        for lo in range(0, len(contexts), step)
    ]
    datasets.concatenate_datasets(pieces).shuffle(seed=seed).save_to_disk(str(path))


def arrow_cache(path: Path, hook: str) -> datasets.Dataset:
    """The Arrow cache opened as SAELens' ActivationsStore opens a cached path."""
    ds = datasets.load_from_disk(str(path))
    ds.set_format(type="torch", columns=[hook, "token_ids"], dtype=torch.float32)
    return ds


def saelens_batches(
    ds: datasets.Dataset, hook: str, batch_size: int, buffer_size: int, seed: int = 0, epochs: int = 1
) -> Iterator[torch.Tensor]:
    """Shuffled batches of the Arrow cache, read as SAELens' ActivationsStore reads a cached path (``epochs``
    times over, the buffer carried across)."""

    def pieces() -> Iterator[torch.Tensor]:
        for _ in range(epochs):
            for i in range(0, len(ds), PROMPTS):
                acts = ds[i : i + PROMPTS][hook]  # (prompts, context, hidden)
                yield acts.reshape(-1, acts.shape[-1])

    yield from mixing_buffer(pieces(), buffer_size, batch_size, torch.Generator().manual_seed(seed))


def mixing_buffer(
    pieces: Iterator[torch.Tensor], buffer_size: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Pieces gathered into a buffer; each time it holds ``buffer_size`` rows or more it is permuted, its first
    half (whole batches, at least one) served and the rest kept; at the end the rest is served as whole batches."""
    buffer: torch.Tensor | None = None
    for piece in pieces:
        buffer = piece if buffer is None else torch.cat([buffer, piece])
        if len(buffer) >= buffer_size:
            buffer = buffer[torch.randperm(len(buffer), generator=generator)]
            served = max(1, len(buffer) // 2 // batch_size) * batch_size
            for lo in range(0, served, batch_size):
                yield buffer[lo : lo + batch_size]
            buffer = buffer[served:]
    if buffer is not None:
        for lo in range(0, len(buffer) - batch_size + 1, batch_size):
            yield buffer[lo : lo + batch_size]


# -- the passes ----------------------------------------------------------------------------------------------


class Feed:
    """actstore's side: one dataset of the layer, made once as a trainer makes it (it keeps its windows'
    memory from one epoch to the next); each pass runs the next ``epochs`` epochs, each another order."""

    def __init__(self, run: Run, args: argparse.Namespace, shuffle: bool, where: Client | None = None) -> None:
        self.dataset = activations(
            where if where is not None else run.store,
            run.model,
            run.method,
            SITE,
            run.layer,
            shuffle=shuffle,
            seed=0,
            batch_size=args.batch_size,
            buffer_size=args.buffer_size,
        )
        self.epoch = 0

    def batches(self, epochs: int = 1) -> Iterator[torch.Tensor]:
        for _ in range(epochs):
            self.dataset.set_epoch(self.epoch)
            self.epoch += 1
            yield from (batch["states"] for batch in DataLoader(self.dataset, batch_size=None))


def reader_passes(run: Run, args: argparse.Namespace, epochs: int = 1) -> Callable[[], Iterator[torch.Tensor]]:
    """Passes of ``epochs`` epochs over the layer, read in order by the local reader (the run opened once), a
    batch at a time, as float32."""
    stored = Store(run.store).run(run.model, run.method)
    n = stored.n_samples

    def batches() -> Iterator[torch.Tensor]:
        for _ in range(epochs):
            for lo in range(0, n, args.batch_size):
                block = stored.read_states([run.layer], lo, min(n, lo + args.batch_size), SITE)[0]
                yield torch.from_numpy(block).float()

    return batches


def timed(batches: Callable[[], Iterator[torch.Tensor]]) -> tuple[float, int]:
    """(seconds, rows) of one pass over ``batches``."""
    started = time.perf_counter()
    rows = sum(len(batch) for batch in batches())
    return time.perf_counter() - started, rows


def fingerprints(states: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One uint64 per row, from the row's bits (sums of products wrap modulo 2**64: exact in any order)."""
    bits = states.view(np.uint32)
    return np.concatenate(
        [(bits[lo : lo + 4096].astype(np.uint64) * weights).sum(axis=1) for lo in range(0, len(bits), 4096)]
    )


def same_rows(batches: Iterator[torch.Tensor], expected: np.ndarray, weights: np.ndarray) -> bool:
    """Whether the rows of one pass, as a multiset, are ``expected``'s (sorted fingerprints)."""
    got = np.concatenate([fingerprints(b.numpy().astype(np.float32, copy=False), weights) for b in batches])
    return len(got) == len(expected) and np.array_equal(np.sort(got), expected)


def side_by_side(
    a: Callable[[], Iterator[torch.Tensor]], b: Callable[[], Iterator[torch.Tensor]], repeats: int
) -> tuple[float, float]:
    """Medians of ``repeats`` passes of a and of b, alternating: (a's tokens/s, b's tokens/s)."""
    rates: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for side, batches in zip(rates, (a, b), strict=True):
            seconds, rows = timed(batches)
            side.append(rows / seconds)
    return float(np.median(rates[0])), float(np.median(rates[1]))


def verdict(ratio: float, target: float) -> str:
    shown = f"{ratio:.3f}" if abs(ratio - target) < 0.005 else f"{ratio:.2f}"  # 1.996 is not shown as 2.00
    return f"{shown}x (target >= {target}x: {'met' if ratio >= target else 'MISSED'})"


def float16_verdict(ratio: float, target: float, dtype: str) -> str:
    """The issue's shuffled and size targets are for runs stored as float16; a float32 run's ratio has none."""
    return verdict(ratio, target) if dtype == "float16" else f"{ratio:.2f}x (no target: float32 stored)"


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def compare(run: Run, folder: Path, args: argparse.Namespace, server: bool = False) -> None:
    """Every figure of one run, printed."""
    arrow = folder / f"arrow-{run.model}-{run.method}"
    started = time.perf_counter()
    write_arrow(arrow, run)
    written = time.perf_counter() - started
    n, hidden = run.states.shape
    mb = n * hidden * 4 / 1e6
    epochs = max(1, round(args.sample_mb / mb))  # per timed pass: small runs are timed over several epochs
    print(
        f"\n{run.label}: {n:,} tokens x {hidden} ({mb:,.0f} MB as float32; Arrow cache written in {written:.1f} s); "
        f"{epochs} epoch{'s' * (epochs > 1)} per timed pass, {args.repeats} pass{'es' * (args.repeats > 1)} per "
        "side, alternating"
    )
    weights = np.random.default_rng(1).integers(1, 2**63, size=hidden, dtype=np.uint64)
    expected = np.sort(fingerprints(run.states, weights))

    shuffled, cache = Feed(run, args, shuffle=True), arrow_cache(arrow, run.hook)

    def theirs(k: int = epochs) -> Iterator[torch.Tensor]:
        return saelens_batches(cache, run.hook, args.batch_size, args.buffer_size, 0, k)

    checks = [("actstore", shuffled.batches(1)), ("Arrow", theirs(1))]
    print(
        "rows of a shuffled epoch, as a multiset, equal to the layer's: "
        + ", ".join(f"{name} {'yes' if same_rows(batches, expected, weights) else 'NO'}" for name, batches in checks)
    )
    fast, slow = side_by_side(lambda: shuffled.batches(epochs), theirs, args.repeats)
    print(
        f"shuffled batches of {args.batch_size:,} (buffer {args.buffer_size:,} rows): actstore {fast:,.0f} tokens/s "
        f"({fast * hidden * 4 / 1e6:,.0f} MB/s as float32), Arrow read as SAELens does {slow:,.0f} tokens/s; "
        f"actstore / Arrow {float16_verdict(fast / slow, 2.0, run.dtype)}"
    )
    ours_bytes = size_of(run.store / run.model / run.method / SITE / "c" / str(run.layer))
    theirs_bytes = size_of(arrow)
    ratio = theirs_bytes / ours_bytes
    print(
        f"bytes on disk: actstore's shard files of the layer {ours_bytes / 1e6:,.1f} MB, the Arrow folder "
        f"{theirs_bytes / 1e6:,.1f} MB; Arrow / actstore {float16_verdict(ratio, 1.5, run.dtype)}"
    )
    in_order, reader = Feed(run, args, shuffle=False), reader_passes(run, args, epochs)
    sequential, read = side_by_side(lambda: in_order.batches(epochs), reader, args.repeats)
    print(
        f"sequential pass: actstore {sequential:,.0f} tokens/s, local reader (as float32) {read:,.0f} tokens/s; "
        f"actstore / reader {verdict(sequential / read, 0.8)}"
    )
    shutil.rmtree(arrow)
    if server:
        with ServerProcess(run.store, folder / "server.log") as process, Client(process.address) as client:
            same = same_rows(Feed(run, args, True, client).batches(1), expected, weights)
            remote = Feed(run, args, False, client)
            served, read = side_by_side(lambda: remote.batches(epochs), reader, args.repeats)
        print(
            f"through a server and the client: rows of a shuffled epoch equal to the layer's: {'yes' if same else 'NO'}"
            f"; sequential pass {served:,.0f} tokens/s, local reader {read:,.0f} tokens/s; server / reader "
            + verdict(served / read, 0.5)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", default="mmlu")
    parser.add_argument("--text-column", default="question")
    parser.add_argument("--limit", type=int, default=530, help="texts captured (SmolLM2)")
    parser.add_argument("--synthetic-tokens", type=int, default=57344, help="tokens of the d = 4096 run")
    parser.add_argument("--batch-size", type=int, default=4096, help="a multiple of 128")
    parser.add_argument("--buffer-size", type=int, default=16384, help="rows mixed at once, on both sides")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample-mb", type=float, default=400, help="float32 MB per timed pass: epochs of a run")
    parser.add_argument("--server", action=argparse.BooleanOptionalAction, default=True, help="SmolLM2 via a server")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    if args.batch_size % CONTEXT:
        parser.error(f"--batch-size must be a multiple of {CONTEXT} (tokens per context)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = smollm2_runs(folder, args)
        compare(runs[0], folder, args, server=args.server)
        compare(runs[1], folder, args)
        compare(synthetic_run(folder, args), folder, args)


if __name__ == "__main__":
    main()
