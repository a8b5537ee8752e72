"""Capture benchmark: every token of MMLU questions as plain text, three sites, SmolLM2-135M, side by side.

    .venv/bin/python bench/capture.py [--limit 64] [--repeats 3] [--sites resid_pre,attn_out,mlp_out]
                                      [--commit-seconds 10] [--torch-threads 1]

Prints the capture ingest's time over the same forward passes with the same hooks and no storage (target:
<= 1.10), alternating so that drift hits both alike; whether the stored values equal the forward's exactly;
the bytes on disk of the states against raw float16 for each stored dtype (target: <= 0.75 for states
stored losslessly, i.e. computed in the dtype they are stored as); --dry-run's estimate against what was
written; and one layer's tokens read through a real server and the client against the local reader (target:
>= 0.5x).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from actstore.client import Client  # noqa: E402
from actstore.ingest.capture_run import CaptureIngest, estimate_capture  # noqa: E402
from actstore.ingest.options import IngestOptions  # noqa: E402
from actstore.ingest.pipeline import DEFAULT_BATCH_SIZE  # noqa: E402
from actstore.server.process import ServerProcess  # noqa: E402
from actstore.store import Store  # noqa: E402
from actstore.store.location import join  # noqa: E402


def options(store: Path, args: argparse.Namespace, dtype: str = "auto", store_dtype: str = "auto") -> IngestOptions:
    return IngestOptions(
        store=store,
        model=args.model,
        dataset=args.dataset,
        text_column=args.text_column,
        limit=args.limit,
        sites=args.sites.split(","),
        positions="all",
        dtype=dtype,
        store_dtype=store_dtype,
        batch_size=DEFAULT_BATCH_SIZE,
        commit_seconds=args.commit_seconds,
        overwrite=True,
    )


def forward_only(ingest: CaptureIngest) -> tuple[float, dict[str, np.ndarray]]:
    """The capture's forward passes, hooks and gathering, batch by batch as the ingest runs them; nothing stored."""
    job = ingest.jobs[0]
    capture, _ = ingest.capture(job)
    texts = job.pending(np.zeros(0, np.int64))
    started = time.perf_counter()
    parts: dict[str, list[np.ndarray]] = {}
    for first in range(0, len(texts), DEFAULT_BATCH_SIZE):
        captured = capture([t.text for t in texts[first : first + DEFAULT_BATCH_SIZE]], dtype=ingest.store_dtype)
        for site, states in captured.states.items():
            parts.setdefault(site, []).append(states)
    return time.perf_counter() - started, {site: np.concatenate(p, axis=1) for site, p in parts.items()}


def stored_bytes(store: Path) -> tuple[int, int, dict[str, np.ndarray]]:
    """(bytes of the states on disk, bytes as raw float16, the states read back) of the run."""
    s = Store(store)
    run = s.runs()[0]
    on_disk = sum(s.location.size(join(run.key, site)) for site in run.sites)
    states = {site: run.read_states(list(range(run.states(site).shape[0])), site=site) for site in run.sites}
    return on_disk, sum(v.size * 2 for v in states.values()), states


def size_ratio(folder: Path, args: argparse.Namespace, store_dtype: str) -> float:
    """States on disk over raw float16 when stored as ``store_dtype`` (the same forward, rounded to it: the size
    of states computed in that dtype, which it stores losslessly)."""
    ingest = CaptureIngest(options(folder / store_dtype, args, "float32", store_dtype))
    ingest.run(ingest.jobs[0], say=lambda _: None)
    on_disk, fp16, _ = stored_bytes(folder / store_dtype)
    return on_disk / fp16


def client_reads(store: Path, repeats: int) -> str:
    """One layer's tokens of the first site, read through a real server and client and by the local reader,
    alternating: the client's speed over the local reader's (target >= 0.5)."""
    run = Store(store).runs()[0]
    site, layer = run.default_site, run.shape[0] // 2
    local, served = [], []
    with ServerProcess(store, store.parent / "server.log") as server, Client(server.address) as client:
        client.hidden_states(run.model, run.method, layers=[layer], site=site)  # warm-up: connection, caches
        for _ in range(repeats):
            started = time.perf_counter()
            expected = Store(store).run(run.model, run.method).read_states([layer], site=site)
            local.append(time.perf_counter() - started)
            started = time.perf_counter()
            got = client.hidden_states(run.model, run.method, layers=[layer], site=site)
            served.append(time.perf_counter() - started)
    assert np.array_equal(got.values, expected), "the client read other values than the local reader"
    mb = expected.nbytes / 1e6
    return (
        f"one layer of {site} ({mb:.1f} MB), medians of {repeats}: local {mb / np.median(local):.0f} MB/s, client "
        f"{mb / np.median(served):.0f} MB/s; client / local {np.median(local) / np.median(served):.2f} (target >= 0.5)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", default="mmlu")
    parser.add_argument("--text-column", default="question")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--sites", default="resid_pre,attn_out,mlp_out")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", action=argparse.BooleanOptionalAction, default=True, help="float16, bfloat16 sizes")
    parser.add_argument("--client", action=argparse.BooleanOptionalAction, default=True, help="client / local reads")
    parser.add_argument(
        "--commit-seconds",
        type=float,
        default=IngestOptions.commit_seconds,
        help="as ingest's: a run longer than it commits in the background while the forward goes on; only its "
        "last commit stops the forward",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="the forward's CPU threads (default: torch's, every core); 1 on a 2-core machine leaves a core to the "
        "writer's commits, as a forward on a GPU leaves the CPU",
    )
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ingest = CaptureIngest(options(folder / "store", args))
        estimated = estimate_capture(ingest, ingest.jobs[0])["bytes"]
        forward_only(ingest)  # warm-up: the model loaded, first-call costs paid
        forwards, fulls = [], []
        for _ in range(args.repeats):
            seconds, computed = forward_only(ingest)
            forwards.append(seconds)
            report = ingest.run(ingest.jobs[0], say=lambda _: None)
            fulls.append(report.seconds)
        on_disk, fp16, stored = stored_bytes(folder / "store")
        equal = all(np.array_equal(stored[site], computed[site]) for site in computed)
        tokens = report.rows
        ratio = np.median(fulls) / np.median(forwards)
        print(
            f"{args.limit} texts, {tokens:,} tokens, sites {args.sites}, compute {ingest.store_dtype} on "
            f"{torch.get_num_threads()} CPU threads, medians of "
            f"{args.repeats}: forward {np.median(forwards):.2f} s, ingest {np.median(fulls):.2f} s "
            f"({tokens / np.median(fulls):,.0f} tokens/s)"
        )
        print(f"ingest / forward with the same hooks: {ratio:.3f} (target <= 1.10)")
        print(f"stored values equal the forward's: {equal}")
        print(f"states on disk / raw float16, stored as {ingest.store_dtype}: {on_disk / fp16:.3f}")
        written = Store(folder / "store").runs()[0].size_bytes()
        print(f"--dry-run's estimate / bytes written: {estimated / written:.2f} (target within 0.5..2)")
        if args.client:
            print(client_reads(folder / "store", args.repeats))
        if args.sizes:
            for store_dtype in ("float16", "bfloat16"):
                ratio = size_ratio(folder, args, store_dtype)
                print(f"states on disk / raw float16, stored as {store_dtype}: {ratio:.3f} (target <= 0.75)")


if __name__ == "__main__":
    main()
