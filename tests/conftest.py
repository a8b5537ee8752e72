"""Small real things for the tests: a tiny random Llama with a tokenizer trained on the spot, MMLU-format
question files (actstore.testing), and a real S3 API on loopback. Nothing is downloaded."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from actstore.testing import LocalS3, local_s3, make_questions, write_jsonl

if TYPE_CHECKING:
    from actstore.store import Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# What each test needs, marked from the fixtures it uses (directly or not), so that lanes can be chosen by
# need: `python3 tasks.py test --quick` leaves out the costly ones (see QUICK in tasks.py).
NEEDS = {
    "model": {"tiny_model"},
    "bucket": {"local_s3_server"},
    "server": {
        "server",
        "served",
        "servers",
        "replicas",
        "open_server",
        "secured",
        "damaged_folder",
        "capture_served",
        "feed_server",
        "served_capture",
    },
    "cluster": {"dask_cluster", "idle_scheduler", "manager"},
}
# Whole files whose tests run a real model end to end, in subprocesses or at length.
SLOW_FILES = {
    "test_smollm2.py",
    "test_study.py",
    "test_bench_smoke.py",
    "test_crash_safety.py",
    "test_finetune.py",
    "test_finetune_recipe.py",
    "test_stream_memory.py",
    "test_job_fairness.py",
}
# Single tests of over ~7 s in the full run (durations of 2026-12-06), mostly processes started and waited on.
SLOW_TESTS = {
    "test_plain_xarray_readers_see_only_whole_commits",
    "test_a_full_disk_is_a_one_line_error_keeps_commits_and_resumes",
    "test_run_to_xarray_is_a_consistent_snapshot_while_a_writer_commits",
    "test_a_dead_scheduler_fails_jobs_with_the_reason_and_is_reconnected_when_back",
    "test_quotas_of_running_and_kept_jobs_per_group",
    "test_an_existing_dask_cluster_runs_the_analysis",
    "test_the_retry_window_is_settable_from_the_shell_and_a_server_started_after_10_s_is_reached",
    "test_a_second_server_on_a_busy_port_refuses_to_start",
    "test_tls_with_several_replicas",
    "test_every_site_and_positions_mode_equals_a_direct_forward_bit_for_bit",  # a server per positions mode
    "test_a_training_job_killed_at_batch_k_resumes_with_batch_k_plus_one",  # three training processes
    # DataLoaders with worker processes, each started anew
    "test_a_corrupted_chunk_raises_corruption_naming_run_layer_and_samples",
    "test_a_killed_worker_ends_the_iteration_with_an_error_not_a_hang",
    "test_workers_forked_after_the_main_process_read_still_read",
    "test_rows_appended_after_the_dataset_was_made_are_not_read",
    "test_a_run_replaced_since_is_refused",
    "test_start_k_with_workers_continues_with_batch_k_plus_one",
    "test_several_runs_read_as_one_with_each_rows_run",
    "test_ranks_of_a_real_process_group_read_disjoint_shares_covering_the_run",
    "test_the_probe_runs_on_a_tiny_study_run",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for need, fixtures in NEEDS.items():
            if used & fixtures:
                item.add_marker(need)
        if item.path.name in SLOW_FILES or getattr(item, "originalname", item.name) in SLOW_TESTS:
            item.add_marker("slow")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Shrink chunks and shards so the tiny model's 32-wide states span many of both, as real runs do."""
    from actstore.store import layout

    monkeypatch.setattr(layout, "INNER_CHUNK_BYTES", 8 * 4 * 32)  # 8 samples per inner chunk
    monkeypatch.setattr(layout, "SHARD_BYTES", 32 * 4 * 32)  # 32 samples per shard


@pytest.fixture(scope="session")
def questions_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "mmlu_small.jsonl", make_questions())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 3-block random Llama and a byte-level BPE tokenizer, saved as an ordinary HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from actstore.ingest.datasets import Question
    from actstore.ingest.prompts import build_prompt

    corpus = [
        build_prompt(Question(0, r["topic"], r["question"], tuple(r[f"answer_{c}"] for c in "abcd"), "A"), [], None)
        + " A B C D"
        for r in make_questions(1)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def ingest_cli(tiny_model, questions_file, tmp_path):
    """Run ``actstore ingest`` in-process on the tiny model and small file; returns (exit code, store)."""
    from actstore.cli import main

    store = tmp_path / "store"

    def run(*extra: str, store_path: Path = store) -> int:
        args = [
            "ingest",
            "--store",
            str(store_path),
            "--model",
            str(tiny_model),
            "--dataset",
            str(questions_file),
            "--dtype",
            "float32",
            "--batch-size",
            "4",
            *extra,
        ]
        return main(args)

    run.store = store
    return run


@pytest.fixture(scope="session")
def local_s3_server(tmp_path_factory) -> Iterator[LocalS3]:
    """A real S3 API (moto's standalone server) on a free loopback port, for the whole session; the AWS
    variables point every client at it, subprocesses included (servers, Dask workers, CLIs)."""
    with local_s3(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint(local_s3_server) -> str:
    return local_s3_server.endpoint


@pytest.fixture
def bucket(local_s3_server, request) -> str:
    """A fresh, empty bucket on the session's S3 server; its URL ``s3://name``."""
    name = (
        "t-"
        + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
        + f"-{random.randrange(16**6):06x}"
    )
    return local_s3_server.create_bucket(name)


@pytest.fixture(params=["folder", pytest.param("bucket", marks=pytest.mark.bucket)])
def any_store(request, tmp_path) -> Store:
    """An empty store in a folder, then in a fresh bucket: what every location kind must do alike is tested
    once over both. The bucket case is marked here (its fixture is reached at setup, after marking by need),
    so the quick lane keeps the folder case."""
    from actstore.store import Store

    return Store(tmp_path / "store" if request.param == "folder" else f"{request.getfixturevalue('bucket')}/store")
