"""Object storage benchmark: a bucket-backed server against zarr-python reading the bucket itself, in one run.

    .venv/bin/python bench/objectstore.py [--layers 30] [--samples 4096] [--hidden 576] [--repeats 7]
                                          [--fetches 100]

Starts a real S3 API on loopback (moto's server, actstore.testing.local_s3), writes one run of bf16-valued
synthetic states into a bucket and the same run into a folder, serves each with `actstore serve`, and prints
side by side:
1. one whole layer: through the client from the bucket-backed server vs zarr-python reading that layer from
   the bucket directly (zarr's FsspecStore over s3fs); ratio of median times, target <= 1.0;
2. one sample across all layers: the S3 requests one read makes (counted in moto's access log) by the
   bucket-backed server and by zarr-python, target no more; and its p50 through the client from the
   bucket-backed server beside the folder-backed one (and zarr-python's on the bucket).
moto's server answers one request at a time (~3-4 ms each here), so latencies count requests more than they
would against a real S3 service, where a read's requests overlap; the request counts carry over.
Reads alternate between the contenders, so a noisy machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import FsspecStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from actstore.client import Client  # noqa: E402
from actstore.server.process import ServerProcess  # noqa: E402
from actstore.store import Store  # noqa: E402
from actstore.testing import LocalS3, local_s3, write_synthetic_run  # noqa: E402

MODEL, METHOD = "bench", "0shot"


def synthetic_states(n_layers: int, n: int, hidden: int) -> np.ndarray:
    """bf16-valued float32 states (as ingest stores them), so they compress as real ones do (~1.5x)."""
    values = np.random.default_rng(0).standard_normal((n_layers, n, hidden), dtype=np.float32)
    return (values.view(np.uint32) & 0xFFFF0000).view(np.float32)


def timed(read) -> float:
    started = time.perf_counter()
    read()
    return time.perf_counter() - started


def requests_per_read(s3: LocalS3, read, picks: list[int]) -> float:
    """S3 requests per call of ``read(sample)``, over ``picks`` (after one warm-up read)."""
    read(picks[0])
    time.sleep(0.2)  # the access log is written after each response
    before = s3.requests()
    for pick in picks:
        read(pick)
    time.sleep(0.5)
    return (s3.requests() - before) / len(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fetches", type=int, default=100, help="one-sample reads timed on each side")
    args = parser.parse_args()
    states = synthetic_states(args.layers, args.samples, args.hidden)
    layer = args.layers // 2
    with tempfile.TemporaryDirectory() as tmp, local_s3(Path(tmp)) as s3:
        url = f"{s3.create_bucket('bench')}/store"
        bucket_store, folder_store = Store(url), Store(Path(tmp) / "store")
        for store in (bucket_store, folder_store):
            write_synthetic_run(store, MODEL, METHOD, states=states)
        plain = zarr.open_array(FsspecStore.from_url(f"{url}/{MODEL}/{METHOD}/hidden_states", read_only=True), mode="r")
        servers = {
            name: ServerProcess(store.url, Path(tmp) / f"{name}.log")
            for name, store in (("bucket", bucket_store), ("folder", folder_store))
        }
        try:
            with Client(servers["bucket"].address) as bucket, Client(servers["folder"].address) as folder:
                from_bucket = bucket.hidden_states(MODEL, METHOD, layers=layer).values[0]
                assert np.array_equal(from_bucket, states[layer]) and np.array_equal(plain[layer], states[layer])
                layer_s = {"client, bucket-backed server": [], "zarr-python on the bucket": []}
                for _ in range(args.repeats):
                    layer_s["client, bucket-backed server"].append(
                        timed(lambda: bucket.hidden_states(MODEL, METHOD, layers=layer))
                    )
                    layer_s["zarr-python on the bucket"].append(timed(lambda: plain[layer]))
                picks = [int(i) for i in np.random.default_rng(1).integers(0, args.samples, args.fetches)]
                per_read = {
                    "bucket-backed server": requests_per_read(
                        s3, lambda i: bucket.hidden_states(MODEL, METHOD, samples=[i]), picks[:20]
                    ),
                    "zarr-python": requests_per_read(s3, lambda i: plain[:, i], picks[:20]),
                }
                sample_s = {"bucket-backed server": [], "folder-backed server": [], "zarr-python on the bucket": []}
                for pick in picks:
                    sample_s["bucket-backed server"].append(
                        timed(lambda: bucket.hidden_states(MODEL, METHOD, samples=[pick]))
                    )
                    sample_s["folder-backed server"].append(
                        timed(lambda: folder.hidden_states(MODEL, METHOD, samples=[pick]))
                    )
                    sample_s["zarr-python on the bucket"].append(timed(lambda: plain[:, pick]))
        finally:
            for server in servers.values():
                server.stop()
    median = {name: float(np.median(times)) for name, times in {**layer_s, **sample_s}.items()}
    mb = states[layer].nbytes / 1e6
    print(
        f"run {states.shape} float32 in moto's S3 server on loopback; one layer = {mb:.1f} MB; "
        f"medians of {args.repeats} (layer) and {args.fetches} (sample) reads"
    )
    for name in layer_s:
        print(f"  one layer, {name:32} {median[name] * 1e3:8.1f} ms  {mb / median[name]:6.0f} MB/s")
    ratio = median["client, bucket-backed server"] / median["zarr-python on the bucket"]
    print(f"  time ratio client / zarr-python: {ratio:.3f}  (target <= 1.0)")
    print(
        f"one sample across {args.layers} layers, S3 requests per read: bucket-backed server "
        f"{per_read['bucket-backed server']:.1f}, zarr-python {per_read['zarr-python']:.1f} (target: no more)"
    )
    for name in sample_s:
        print(
            f"  one sample, {name:33} p50 {median[name] * 1e3:6.2f} ms  "
            f"p99 {np.percentile(sample_s[name], 99) * 1e3:6.2f} ms"
        )


if __name__ == "__main__":
    main()
