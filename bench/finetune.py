"""Fine-tuning benchmark: training time per question per epoch over the ingest's forward time per question,
SmolLM2-135M on the same MMLU questions, measured side by side in one run (target: <= 4).

    .venv/bin/python bench/finetune.py [--subjects a,b,...] [--train-pool 20] [--epochs 1] [--repeats 2]

The questions are the training pool of the study job's subjects (0-shot prompts). The forward time is
what ingest spends per question (StateExtractor in batches of 8, in storage order, the model loaded and
warm); the training time is the training steps alone (the study's recipe: LoRA r = 64 on every
projection, effective batch 16), read from the run's record. Both sides are warmed up first (one forward
pass, one training run, not counted: first calls pay one-time kernel and allocator set-up), then forward
and training passes alternate; the ratio reported is the median of the repeats.
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
from actstore.ingest.model import load_model  # noqa: E402
from actstore.ingest.pipeline import DEFAULT_BATCH_SIZE  # noqa: E402
from actstore.ingest.selection import storage_order  # noqa: E402
from actstore.ingest.prompts import build_prompt  # noqa: E402
from actstore.study.job import SUBJECTS  # noqa: E402


def forward_seconds(extractor: StateExtractor, finetune: Finetune) -> float:
    prompts = [build_prompt(q, [], None) for q in storage_order(finetune.questions)]
    started = time.perf_counter()
    for start in range(0, len(prompts), DEFAULT_BATCH_SIZE):
        extractor(prompts[start : start + DEFAULT_BATCH_SIZE])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", default=",".join(SUBJECTS))
    parser.add_argument("--train-pool", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        def finetune(i: int) -> Finetune:
            return Finetune(FinetuneOptions(out=Path(tmp) / f"adapter{i}", subjects=args.subjects.split(","),
                                            train_pool=args.train_pool, hyper=Hyperparameters(epochs=args.epochs)))

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
            print(f"repeat {i + 1}: forward {forward * 1000:.1f} ms/question, training {training * 1000:.1f} "
                  f"ms/question/epoch, ratio {ratios[-1]:.2f}")
        print(json.dumps({"questions": n, "epochs": args.epochs, "dtype": record["recipe"]["compute_dtype"],
                          "device": record["device"], "training_over_forward": [round(r, 2) for r in ratios],
                          "median": round(float(np.median(ratios)), 2),
                          "target": "<= 4"}))


if __name__ == "__main__":
    main()
