"""Fine-tuning benchmark: training time per question per epoch over the ingest's forward time per question,
SmolLM2-135M on the same MMLU questions, measured side by side in one run (target: <= 4); then the probe
time per question of the trained adapter, kept unmerged beside the base (its LoRA branch in float32, the
authors', or in the compute dtype), over the base model's.

    .venv/bin/python bench/finetune.py [--subjects a,b,...] [--train-pool 20] [--epochs 1] [--repeats 2]
                                       [--probes 80]

The questions are the training pool of the study job's subjects (0-shot prompts). The forward time is
what ingest spends per question (StateExtractor in batches of 8, in storage order, the model loaded and
warm); the training time is the training steps alone (the study's recipe: LoRA r = 64 on every
projection, effective batch 16), read from the run's record. Both sides are warmed up first (one forward
pass, one training run, not counted: first calls pay one-time kernel and allocator set-up), then forward
and training passes alternate; the ratio reported is the median of the repeats. The probes are the first
``--probes`` questions the study job probes in those subjects (0-shot prompts, the subject header included,
batches of 8 as ingest runs them), timed for the base model and each adapter branch in turn, ``--repeats``
times after a warm-up batch each; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from actstore.finetune.options import FinetuneOptions, Hyperparameters  # noqa: E402
from actstore.finetune.train import Finetune  # noqa: E402
from actstore.ingest.extract import StateExtractor  # noqa: E402
from actstore.ingest.model import LoadedModel, ModelSource, attach_adapter, load_model  # noqa: E402
from actstore.ingest.pipeline import DEFAULT_BATCH_SIZE  # noqa: E402
from actstore.ingest.prompts import build_prompt  # noqa: E402
from actstore.ingest.selection import select, storage_order  # noqa: E402
from actstore.study.job import SUBJECTS  # noqa: E402


def forward_seconds(extractor: StateExtractor, finetune: Finetune) -> float:
    return probe_seconds(extractor, [build_prompt(q, [], None) for q in storage_order(finetune.questions)])


def probe_seconds(extractor: StateExtractor, prompts: list[str]) -> float:
    started = time.perf_counter()
    for start in range(0, len(prompts), DEFAULT_BATCH_SIZE):
        extractor(prompts[start : start + DEFAULT_BATCH_SIZE])
    return time.perf_counter() - started


def probe_costs(loaded: LoadedModel, adapter: Path, finetune: Finetune, n: int, repeats: int) -> dict:
    """Milliseconds per probed question: the base model, and the adapter unmerged with each branch dtype."""
    queries = storage_order(
        select(finetune.dataset, finetune.opts.subjects, train_pool=finetune.opts.train_pool).queries[:n]
    )
    prompts = [build_prompt(q, [], None) for q in queries]
    models = {
        "base": loaded,
        "float32 branch": attach_adapter(loaded, ModelSource(str(adapter)), None),
        "compute branch": attach_adapter(loaded, ModelSource(str(adapter)), loaded.dtype),
    }
    extractors = {name: StateExtractor(model, "normed") for name, model in models.items()}
    for extractor in extractors.values():
        extractor(prompts[:DEFAULT_BATCH_SIZE])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, extractor in extractors.items():
            times[name].append(probe_seconds(extractor, prompts) / len(prompts))
    ms = {name: float(np.median(t)) * 1000 for name, t in times.items()}
    print(
        f"probes of {len(prompts)} questions: "
        + ", ".join(f"{name} {value:.1f} ms/question" for name, value in ms.items())
    )
    return {
        "probe_questions": len(prompts),
        "probe_ms_per_question": {k: round(v, 1) for k, v in ms.items()},
        "probe_over_base": {k: round(v / ms["base"], 2) for k, v in ms.items() if k != "base"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", default=",".join(SUBJECTS))
    parser.add_argument("--train-pool", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--probes", type=int, default=80, help="questions probed per model (default 80)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:

        def finetune(i: int) -> Finetune:
            return Finetune(
                FinetuneOptions(
                    out=Path(tmp) / f"adapter{i}",
                    subjects=args.subjects.split(","),
                    train_pool=args.train_pool,
                    eval_per_subject=0,
                    hyper=Hyperparameters(epochs=args.epochs),
                )
            )

        first = finetune(0)
        loaded = load_model(first.source, first.device, first.dtype)
        extractor = StateExtractor(loaded, "normed")
        forward_seconds(extractor, first)  # warm-ups
        first.run()
        n = len(first.questions)
        ratios = []
        for i in range(args.repeats):
            forward = forward_seconds(extractor, first) / n
            record = finetune(i + 1).run()
            training = record["seconds"]["training_steps"] / (n * args.epochs)
            ratios.append(training / forward)
            print(
                f"repeat {i + 1}: forward {forward * 1000:.1f} ms/question, training {training * 1000:.1f} "
                f"ms/question/epoch, ratio {ratios[-1]:.2f}"
            )
        probes = probe_costs(loaded, Path(tmp) / "adapter0", first, args.probes, args.repeats)
        print(
            json.dumps(
                {
                    "questions": n,
                    "epochs": args.epochs,
                    "dtype": record["recipe"]["compute_dtype"],
                    "device": record["device"],
                    "training_over_forward": [round(r, 2) for r in ratios],
                    "median": round(float(np.median(ratios)), 2),
                    "target": "<= 4",
                    **probes,
                }
            )
        )


if __name__ == "__main__":
    main()
