"""Ingest benchmark: SmolLM2-135M on 200 MMLU questions (0-shot), measured side by side in one run.

    .venv/bin/python bench/ingest.py [--limit 200] [--repeats 2] [--subjects anatomy,astronomy]

Prints the whole ingest's time over the model's forward time alone (target: <= 1.05), the bytes
on disk against raw fp16 (target: >= 1.3x smaller), whether the stored values equal the forward
pass's exactly, and questions/s. Forward-only and full passes alternate, so drift hits both alike.
For a GGUF model (the packaged SmolLM2 is Q4_1) it then compares the compute dtypes of its weights:
forward time per question in float32 and in bfloat16 on the same questions, alternating, side by side
(``actstore.ingest.model`` loads GGUF weights in the dtype this showed faster).
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

from actstore.ingest.extract import StateExtractor  # noqa: E402
from actstore.ingest.model import load_model  # noqa: E402
from actstore.ingest.options import IngestOptions  # noqa: E402
from actstore.ingest.pipeline import DEFAULT_BATCH_SIZE, Ingest  # noqa: E402
from actstore.ingest.prompts import build_prompt  # noqa: E402


def forward_only(ingest: Ingest, plan, extractor: StateExtractor) -> tuple[float, np.ndarray]:
    shots = {s: ingest.selection.shots(s, plan.method.k) for s in ingest.selection.shot_pool}
    started = time.perf_counter()
    states = []
    for start in range(0, len(plan.pending), DEFAULT_BATCH_SIZE):
        batch = plan.pending[start : start + DEFAULT_BATCH_SIZE]
        states.append(extractor([build_prompt(q, shots[q.subject], 42) for q in batch])[0])
    return time.perf_counter() - started, np.concatenate(states, axis=1)


def compare_gguf_dtypes(ingest: Ingest, plan, repeats: int) -> None:
    """Forward time per question with the GGUF weights in float32 and in bfloat16, alternating."""
    loaded = {ingest.dtype: ingest.model(plan.source)}
    for dtype in (torch.float32, torch.bfloat16):
        if dtype not in loaded:
            loaded[dtype] = load_model(plan.source, ingest.device, dtype)
    extractors = {dtype: StateExtractor(model, "normed") for dtype, model in loaded.items()}
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in extractors}
    for dtype, extractor in extractors.items():
        forward_only(ingest, plan, extractor)  # warm-up
    for _ in range(repeats):
        for dtype, extractor in extractors.items():
            times[dtype].append(forward_only(ingest, plan, extractor)[0] / len(plan.pending))
    per_question = {str(dtype).removeprefix("torch."): np.median(t) * 1e3 for dtype, t in times.items()}
    print(
        f"GGUF weights ({plan.source.gguf_file}), forward ms/question, medians of {repeats}: "
        + ", ".join(f"{name} {ms:.1f}" for name, ms in per_question.items())
        + f"; float32 / bfloat16: {per_question['float32'] / per_question['bfloat16']:.2f}"
        + f"; faster: {min(per_question, key=per_question.get)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--subjects",
        type=lambda text: text.split(","),
        default=None,
        help="comma-separated MMLU subjects (default: all, the limit spread over them)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ingest = Ingest(
            IngestOptions(store=Path(tmp) / "store", limit=args.limit, subjects=args.subjects, overwrite=True)
        )
        plan = next(ingest.plans())
        extractor = StateExtractor(ingest.model(plan.source), "normed")
        forward_only(ingest, plan, extractor)  # warm-up
        forward_times, ingest_times = [], []
        for _ in range(args.repeats):
            seconds, reference = forward_only(ingest, plan, extractor)
            forward_times.append(seconds)
            ingest_times.append(ingest.run(plan).seconds)
        run = ingest.store.run(ingest.name, plan.method.name)
        stored = run.hidden_states[:]
        n_layers, n, hidden = stored.shape
        raw_fp16 = n_layers * n * hidden * 2
        states_bytes = run.location.size(f"{run.key}/hidden_states")
        lossless = np.array_equal(stored, reference)
        run_bytes = run.size_bytes()

    forward, full = np.median(forward_times), np.median(ingest_times)
    print(
        f"questions: {n}, layers: {n_layers}, hidden: {hidden}, compute dtype: {run.attrs['recipe']['compute_dtype']}"
    )
    print(f"forward only: {forward:.2f} s   whole ingest: {full:.2f} s   (medians of {args.repeats})")
    print(f"ingest / forward time: {full / forward:.3f}  (target <= 1.05)")
    print(f"questions/s: {n / full:.1f} ingest, {n / forward:.1f} forward only")
    print(
        f"hidden_states on disk: {states_bytes / 1e6:.2f} MB, raw fp16 {raw_fp16 / 1e6:.2f} MB: "
        f"{raw_fp16 / states_bytes:.2f}x smaller (target >= 1.3)"
    )
    print(f"whole run on disk: {run_bytes / 1e6:.2f} MB; stored equals the forward pass exactly: {lossless}")
    if plan.source.gguf_file:
        compare_gguf_dtypes(ingest, plan, args.repeats)


if __name__ == "__main__":
    main()
