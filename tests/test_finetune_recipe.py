"""The fine-tuned arm as the study's authors ran it: their checkpoint schedule, optimisation, training prompt,
held-out accuracy at every checkpoint with a stop there, and probes that keep the adapter unmerged."""

import copy
import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from test_finetune import finetune_args, rule_file  # noqa: F401 (rule_file: a fixture)

from actstore.adapter import RECORD
from actstore.cli import main
from actstore.finetune.options import FinetuneOptions, Hyperparameters, checkpoint_schedule, lr_factor
from actstore.finetune.train import Finetune
from actstore.ingest.extract import StateExtractor
from actstore.ingest.model import LoadedModel, ModelSource, load_model, peft_quietly
from actstore.ingest.options import IngestOptions
from actstore.ingest.pipeline import Ingest
from actstore.ingest.prompts import build_prompt, header
from actstore.store import Store

AUTHORS_40 = [1, 2, 3, 4, 6, 9, 13, 19, 28]  # np.unique(np.around(np.geomspace(1, 40, 10, endpoint=False)))


def test_the_schedule_is_the_authors_log_spaced_steps_plus_every_epoch_end():
    assert checkpoint_schedule(40, 10, 10, None) == sorted(set(AUTHORS_40) | {10, 20, 30})
    assert checkpoint_schedule(40, 40, 10, None) == AUTHORS_40  # one epoch: its end is the final adapter
    assert checkpoint_schedule(40, 10, 10, 8) == [8, 10, 16, 20, 24, 30, 32]  # --save-every instead
    assert checkpoint_schedule(40, 40, 0, None) == []


def test_the_learning_rate_warms_up_from_1_percent_then_decays_by_cosine_to_1_percent():
    h = Hyperparameters()
    assert h.max_grad_norm == 0 and h.warmup_steps(40) == 2 and h.warmup_steps(1000) == 3  # int(0.05 T), <= 3
    factors = [lr_factor(step, 40, 2, 0.01) for step in range(41)]
    assert factors[0] == pytest.approx(0.01) and factors[1] == pytest.approx(0.505) and factors[2] == 1.0
    assert factors[40] == pytest.approx(0.01) and all(a >= b for a, b in zip(factors[2:], factors[3:]))


@pytest.fixture(scope="module")
def forty_steps(tmp_path_factory, tiny_model, rule_file):
    """A 40-step run with the default schedule: 54 training questions in batches of 16, 4 steps an epoch, 10
    epochs."""
    out = tmp_path_factory.mktemp("forty") / "sft"
    args = finetune_args(out, tiny_model, rule_file, "--epochs", "10")
    args[args.index("--batch-size") + 1] = "16"
    assert main(args) == 0
    return out, json.loads((out / RECORD).read_text())


def test_a_40_step_record_names_the_authors_checkpoints_no_clipping_and_the_header_free_prompt(forty_steps):
    out, record = forty_steps
    assert record["total_steps"] == 40 and record["step"] == 40
    epoch_ends = [4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert record["checkpoints"]["steps"] == sorted(set(AUTHORS_40) | set(epoch_ends))
    assert "geomspace(1, 40, 10, endpoint=False)" in record["checkpoints"]["rule"]
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == record["checkpoints"]["steps"]
    recipe = record["recipe"]
    assert recipe["clipping"].startswith("none") and recipe["hyperparameters"]["max_grad_norm"] == 0
    assert "without the subject header" in recipe["prompt_format"]
    assert "warm-up over 2 steps" in recipe["schedule"]
    assert "paper's text" in recipe["weighting"]


def test_held_out_accuracy_is_measured_at_every_checkpoint_on_questions_neither_trained_nor_probed(
    forty_steps, tiny_model, rule_file, tmp_path
):
    _, record = forty_steps
    held_out = record["accuracy"]["held_out"]
    assert [step for step, _ in held_out] == [0, *record["checkpoints"]["steps"], 40]
    assert all(0 <= value <= 1 for _, value in held_out) and record["accuracy"]["n_held_out"] == 6
    ids = set(record["training"]["held_out_ids"])
    queries = Ingest(
        IngestOptions(store=tmp_path / "s", model=str(tiny_model), dataset=str(rule_file))
    ).selection.queries
    assert len(ids) == 6 and not ids & set(record["training"]["ids"]) and not ids & {q.id for q in queries}


def test_the_training_prompt_has_no_subject_header_unless_asked(tiny_model, rule_file, tmp_path):
    def prompts(*header_flag: bool) -> list[str]:
        hyper = Hyperparameters(subject_header=bool(header_flag and header_flag[0]))
        return Finetune(
            FinetuneOptions(out=tmp_path / "x", model=str(tiny_model), dataset=str(rule_file), hyper=hyper)
        ).prompts

    plain, with_header = prompts(), prompts(True)
    assert not any(p.startswith("The following are") for p in plain) and all(p.endswith("\nAnswer:") for p in plain)
    assert [h.removeprefix(h[: h.index("\n\n") + 2]) for h in with_header] == plain
    assert with_header[0].startswith(header("anatomy"))


def test_stop_accuracy_ends_training_at_the_first_checkpoint_that_reaches_it(tiny_model, rule_file, tmp_path):
    out = tmp_path / "sft"
    assert main(finetune_args(out, tiny_model, rule_file, "--epochs", "12", "--stop-accuracy", "0.01")) == 0
    record = json.loads((out / RECORD).read_text())
    first = record["checkpoints"]["steps"][0]
    assert record["stopped_early"] and record["step"] == first == 1 and len(record["losses"]) == 1
    assert record["recipe"]["stop_accuracy"] == 0.01 and record["complete"]


# -- probes keep the adapter ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_update(tmp_path_factory, tiny_model, rule_file):
    """An adapter of small updates (a few steps at the study's rate) trained in bf16, and its bf16 probes."""
    root = tmp_path_factory.mktemp("small")
    out, store = root / "sft", root / "store"
    args = finetune_args(out, tiny_model, rule_file, "--epochs", "1", "--learning-rate", "1e-4", "--checkpoints", "0")
    args[args.index("--dtype") + 1] = "bfloat16"
    assert main(args) == 0
    for branch in ("float32", "compute"):
        assert (
            main(
                [
                    "ingest",
                    "--store",
                    str(store / branch),
                    "--model",
                    str(tiny_model),
                    "--dataset",
                    str(rule_file),
                    "--dtype",
                    "bfloat16",
                    "--methods",
                    "0shot,finetuned",
                    "--checkpoint",
                    str(out),
                    "--adapter-branch",
                    branch,
                ]
            )
            == 0
        )
    return out, store


def test_stored_finetuned_states_equal_the_unmerged_adapter_and_a_bf16_merge_would_not(
    small_update, tiny_model, rule_file
):
    out, store = small_update
    base = load_model(ModelSource.resolve(str(tiny_model)), torch.device("cpu"), torch.bfloat16)
    with peft_quietly():
        authors = PeftModel.from_pretrained(copy.deepcopy(base.model), out).eval()  # as their extract_repr.py
        merged = PeftModel.from_pretrained(copy.deepcopy(base.model), out).merge_and_unload().to(torch.bfloat16)
    assert next(p for n, p in authors.named_parameters() if "lora_A" in n).dtype == torch.float32
    stored = Store(store / "float32")
    prompts = _prompts(stored, rule_file)
    tuned = stored.run("tiny-llama", "finetuned").hidden_states[:]
    expected = _direct(
        LoadedModel(authors.base_model.model, base.tokenizer, base.source, base.device, base.dtype), prompts
    )
    np.testing.assert_array_equal(tuned, expected)  # the authors' computation, bit for bit
    as_merged = _direct(LoadedModel(merged, base.tokenizer, base.source, base.device, base.dtype), prompts)
    assert not np.array_equal(as_merged, expected)  # a bf16 merge rounds part of the update away
    base_states = stored.run("tiny-llama", "0shot").hidden_states[:]
    update = np.abs(expected - base_states).mean()
    assert update > 0 and np.abs(as_merged - expected).mean() > 0.05 * update


def test_the_compute_branch_equals_the_adapter_as_training_computed_it(small_update, tiny_model, rule_file):
    out, store = small_update
    base = load_model(ModelSource.resolve(str(tiny_model)), torch.device("cpu"), torch.bfloat16)
    with peft_quietly():
        model = PeftModel.from_pretrained(copy.deepcopy(base.model), out, autocast_adapter_dtype=False).eval()
    model = model.to(torch.bfloat16)
    compute = Store(store / "compute")
    expected = _direct(
        LoadedModel(model.base_model.model, base.tokenizer, base.source, base.device, base.dtype),
        _prompts(compute, rule_file),
    )
    np.testing.assert_array_equal(compute.run("tiny-llama", "finetuned").hidden_states[:], expected)
    recipes = [
        Store(store / b).run("tiny-llama", "finetuned").attrs["recipe"]["adapter"] for b in ("float32", "compute")
    ]
    assert "float32" in recipes[0] and "compute dtype" in recipes[1] and all("unmerged" in r for r in recipes)


def _prompts(store: Store, rule_file) -> list[str]:
    from actstore.ingest.datasets import load_dataset

    by_id = {q.id: q for q in load_dataset(rule_file).questions}
    return [build_prompt(by_id[int(i)], [], None) for i in store.run("tiny-llama", "finetuned").labels()["sample"]]


def _direct(loaded: LoadedModel, prompts: list[str]) -> np.ndarray:
    """The states ingest would store, computed here in batches of 8 (ingest's default batch size)."""
    extractor = StateExtractor(loaded, "normed")
    return np.concatenate([extractor(prompts[i : i + 8])[0] for i in range(0, len(prompts), 8)], axis=1)
