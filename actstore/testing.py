"""Real things for tests and benchmarks, made on the spot (``pip install 'actstore[dev]'``): a real S3 API on
loopback, synthetic runs written through the store, the stored objects of a run as an operator reaches them,
and MMLU-format question files.

The S3 API is moto's standalone server, not a mock of any client library: s3fs, boto3 and zarr talk HTTP to it
as to any S3-compatible service. Its access log has one line per request, which is how the benchmarks count
the requests a read makes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from actstore.store import Store
    from actstore.store.capture import CaptureLayout

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@dataclass
class LocalS3:
    endpoint: str
    log: Path

    def requests(self) -> int:
        """Requests served so far (lines of the access log)."""
        return sum(1 for line in self.log.read_text(errors="replace").splitlines() if '" ' in line and "HTTP/" in line)

    def create_bucket(self, name: str) -> str:
        """A new bucket; its URL ``s3://name``."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"


@contextlib.contextmanager
def local_s3(folder: Path) -> Iterator[LocalS3]:
    """moto's S3 server on a free loopback port, its log in ``folder``; the AWS variables of this process
    point at it meanwhile (subprocesses inherit them) and are restored afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = folder / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    try:
        _wait_until_up(endpoint, server, log)
        os.environ.update(
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint,
        )
        yield LocalS3(endpoint, log)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        server.terminate()
        server.wait(timeout=10)


def _wait_until_up(endpoint: str, server: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not start (log: {log})") from None
            time.sleep(0.1)


SUBJECTS = ("anatomy", "astronomy", "college_biology")
PER_SUBJECT = 34  # 5 held out as shots, 20 as fine-tuning questions, 9 probed by every method
WORDS = "cell bone star orbit protein heart moon gene lung planet enzyme nerve comet tissue light mass".split()


def small_disk(mount: Path, size: str) -> list[str] | None:
    """A command prefix that runs a command with a tmpfs of ``size`` (as mount's ``size=``, e.g. "32m") mounted
    at ``mount``: in an unprivileged user and mount namespace where the kernel allows one, else (as root)
    mounted for the command; None if neither."""
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"'
    if shutil.which("unshare"):
        prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(mount)]
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    if os.geteuid() == 0:
        return [
            "sh",
            "-c",
            f'mount -t tmpfs -o size={size} tmpfs "$0" || exit 1; "$@"; rc=$?; umount "$0"; exit $rc',
            str(mount),
        ]
    return None


_REFUSE_THEN_FORCE = """
import json, os, subprocess, sys
argv, mount = json.loads(sys.argv[1]), sys.argv[2]
out = []
for extra in ([], ["--no-space-check"]):
    done = subprocess.run([sys.executable, "-m", "actstore", *argv, *extra], capture_output=True, text=True)
    out.append({"rc": done.returncode, "err": done.stderr, "files": sorted(os.listdir(mount))})
print(json.dumps(out))
"""


def refused_then_forced(prefix: list[str], mount: Path, argv: list[str]) -> tuple[dict, dict]:
    """``actstore argv`` run twice under ``prefix`` (a small_disk mounted at ``mount``): as given, then with
    --no-space-check; each as {"rc", "err", "files": what mount then holds}."""
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _REFUSE_THEN_FORCE, json.dumps(argv), str(mount)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    refused, forced = json.loads(done.stdout)
    return refused, forced


def make_questions(seed: int = 0) -> list[dict]:
    """MMLU-jsonl rows (answer_a..d, correct_answer, topic) of varied length, plus one header row."""
    rng = random.Random(seed)
    rows = []
    for subject in SUBJECTS:
        for i in range(PER_SUBJECT):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25)))
            rows.append(
                {
                    "question": f"Question {i} on {subject.replace('_', ' ')}: which {words}?",
                    **{f"answer_{c}": f"{c} {rng.choice(WORDS)} {rng.choice(WORDS)}" for c in "abcd"},
                    "correct_answer": "ABCD"[rng.randrange(4)],
                    "topic": subject.replace("_", " "),
                }
            )
    rows.insert(
        20, {"question": "question", **{f"answer_{c}": c for c in "abcd"}, "correct_answer": "answer", "topic": "topic"}
    )
    return rows


def ingest_args(store: str | Path, model: str | Path, dataset: str | Path, *extra: str) -> list[str]:
    """``actstore ingest`` arguments for a test model, in float32 (the same bits on every CPU), then ``extra``."""
    return [
        "ingest",
        "--store",
        str(store),
        "--model",
        str(model),
        "--dataset",
        str(dataset),
        "--dtype",
        "float32",
        *extra,
    ]


def token_capture_args(store: Path, model: Path, folder: Path, seed: int = 3, n: int = 40) -> list[str]:
    """``actstore ingest`` arguments capturing every token of ``n`` test questions as plain texts (their topic as
    a label, the file written in ``folder``) at ``resid_post`` and ``mlp_out`` into ``store``'s ``{model}/0shot``."""
    rows = [{"text": r["question"], "topic": r["topic"]} for r in make_questions(seed)[:n]]
    data = write_jsonl(folder / "texts.jsonl", rows)
    sites = ["--sites", "resid_post,mlp_out"]
    return ingest_args(
        store, model, data, "--text-column", "text", "--label-columns", "topic", "--positions", "all", *sites
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def derived_files(store: Path) -> dict[Path, int]:
    """Every file of the store's cached analyses, with its modification time: equal snapshots mean that
    nothing was computed or written again."""
    return {p: p.stat().st_mtime_ns for p in store.glob("*/*/derived/**/*") if p.is_file()}


def synthetic_labels(start: int, n: int) -> dict[str, np.ndarray]:
    """Labels of samples ``start`` to ``start + n``: sample ids, subject "s", answer "A", prediction "B", wrong."""
    import numpy as np

    text = {
        name: np.array([value] * n, dtype=object)
        for name, value in (("subject", "s"), ("answer", "A"), ("prediction", "B"))
    }
    return {"sample": np.arange(start, start + n), **text, "correct": np.zeros(n, dtype=bool)}


def write_synthetic_run(
    store: Store,
    model: str,
    method: str,
    n_layers: int = 3,
    n_samples: int = 100,
    hidden: int = 32,
    batch: int | None = None,
    seed: int = 0,
    states: np.ndarray | None = None,
    labels: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """A public run written through the store's run writer, each ``batch`` samples one commit (all in one
    commit by default); returns its states. For tests and benches that need a run of a given size or content
    without a model.

    ``states``: the values to store, (layer, sample, hidden), in place of standard-normal float32 ones of
    the sizes given, drawn from ``seed``. ``labels``: every sample's, in place of ``synthetic_labels``. The
    recipe is ``{"synthetic": seed}``: a run written again under another seed is refused (RecipeMismatch),
    under the same seed appended to.
    """
    import numpy as np

    if states is None:
        states = np.random.default_rng(seed).standard_normal((n_layers, n_samples, hidden), dtype=np.float32)
    n_layers, n_samples, hidden = states.shape
    labels = synthetic_labels(0, n_samples) if labels is None else labels
    batch = batch or n_samples
    with store.writer(
        model,
        method,
        recipe={"synthetic": seed},
        attrs={"access": {"visibility": "public"}},
        n_layers=n_layers,
        hidden=hidden,
    ) as writer:
        for start in range(0, n_samples, batch):
            stop = min(start + batch, n_samples)
            writer.add(states[:, start:stop], {name: values[start:stop] for name, values in labels.items()})
            writer.commit()
    return states


def write_synthetic_capture(
    store: Store,
    model: str,
    method: str,
    capture: CaptureLayout,
    lengths: np.ndarray,
    *,
    commits: int = 3,
    seed: int = 0,
    provenance: dict | None = None,
) -> None:
    """A capture run of token rows written through the run writer in ``commits`` commits: ``len(lengths)`` texts
    of ``lengths`` tokens under random sample ids, standard normal states at every site, and every array the
    layout asks for (label columns by their dtype, top logits, letter logits) filled from the text's index.
    For tests and benches that need a capture run of given shapes without a model."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * len(lengths))[: len(lengths)]
    labels = {
        "float64": lambda t: (t % 4) / 2,
        "bool": lambda t: t % 3 == 0,
        "str": lambda t: np.array([f"t{i % 5}" for i in t], dtype=object),
        "int64": lambda t: t % 7,
    }
    with store.begin_run(model, method, recipe={"positions": "all", "synthetic": seed}) as writer:
        writer.start(provenance=provenance or {}, capture=capture, planned=len(lengths))
        for batch in np.array_split(np.arange(len(lengths)), commits):
            texts = np.repeat(batch, lengths[batch])
            rows = len(texts)
            coords = {
                "sample": ids[texts],
                "position": np.concatenate([np.arange(k) for k in lengths[batch]]),
                "token_id": rng.integers(0, 400, size=rows),
                **{name: labels[dtype](texts) for name, dtype in capture.labels.items()},
            }
            if capture.top_k:
                coords["top_ids"] = rng.integers(0, 400, size=(rows, capture.top_k))
                coords["top_logits"] = rng.standard_normal((rows, capture.top_k), dtype=np.float32)
            if capture.letters:
                coords["letter_logits"] = rng.standard_normal((rows, len(capture.letters)), dtype=np.float32)
            states = {
                site: rng.standard_normal((capture.n_layers, rows, width), dtype=np.float32)
                for site, width in capture.sites.items()
            }
            writer.add(states, coords)
            writer.commit()


def shard_key(model: str, method: str, layer: int, shard: int) -> str:
    """The key of one shard of a run's states in its store (a file's path below a folder store's root)."""
    from actstore.store.run import STATES

    return f"{model}/{method}/{STATES}/c/{layer}/{shard}/0"


def read_object(store: Store, key: str) -> bytes:
    """The bytes stored at ``key``, in a folder or a bucket alike, read past the store's own reader."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    found = sync(store.location.zarr_store().get(key, default_buffer_prototype()))
    if found is None:
        raise FileNotFoundError(f"no {key} in store {store.url}")
    return found.to_bytes()


def write_object(store: Store, key: str, data: bytes) -> None:
    """Replace the bytes at ``key`` behind the store's back, as an operator, a sync tool or a failing disk
    would: how tests damage runs in a folder or a bucket alike."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    sync(store.location.zarr_store().set(key, default_buffer_prototype().buffer.from_bytes(data)))
