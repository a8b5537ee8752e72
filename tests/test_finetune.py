"""``actstore finetune``: the study's LoRA recipe on the tiny model, its checkpoints, and probing them."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from actstore.adapter import RECORD, AdapterError, finished_adapter
from actstore.cli import main
from actstore.client import Client
from actstore.finetune.options import FinetuneOptions, Hyperparameters
from actstore.finetune.train import Finetune, letter_losses, subject_weights
from actstore.ingest.datasets import Question
from actstore.ingest.extract import encode, letter_token_ids
from actstore.ingest.model import ModelSource, peft_quietly
from actstore.ingest.options import IngestOptions
from actstore.ingest.pipeline import Ingest
from actstore.server.process import ServerProcess
from actstore.store import Store
from actstore.testing import PER_SUBJECT, SUBJECTS, write_jsonl

COLOURS = {"red": "A", "green": "B", "blue": "C", "gold": "D"}
# Small and fast: a rank-8 adapter at a high rate learns the tiny model's rule in a few dozen steps.
FAST = [
    "--rank",
    "8",
    "--alpha",
    "16",
    "--learning-rate",
    "3e-3",
    "--batch-size",
    "8",
    "--micro-batch",
    "4",
    "--dtype",
    "float32",
]


def rule_questions(seed: int = 0) -> list[dict]:
    """Questions whose answer follows from one word: the colour named picks the letter."""
    rng = random.Random(seed)
    rows = []
    for subject in SUBJECTS:
        for i in range(PER_SUBJECT):
            colour = rng.choice(list(COLOURS))
            rows.append(
                {
                    "question": f"Item {i}: the colour is {colour}.",
                    **{f"answer_{c}": f"option {c}" for c in "abcd"},
                    "correct_answer": COLOURS[colour],
                    "topic": subject.replace("_", " "),
                }
            )
    return rows


@pytest.fixture(scope="module")
def rule_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rule") / "rule.jsonl", rule_questions())


def finetune_args(out, model, data, *extra):
    return ["finetune", "--out", str(out), "--model", str(model), "--dataset", str(data), *FAST, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, rule_file):
    """An adapter trained on the rule, and a store with the base model's and its checkpoints' probes."""
    root = tmp_path_factory.mktemp("trained")
    out, store = root / "sft", root / "store"
    # trained on the probes' prompt (header included): the tiny random model does not carry a rule learnt
    # without the header over to prompts with it (probed accuracy 0.48 against > 0.85)
    assert (
        main(finetune_args(out, tiny_model, rule_file, "--epochs", "12", "--save-every", "8", "--subject-header")) == 0
    )
    assert (
        main(
            [
                "ingest",
                "--store",
                str(store),
                "--model",
                str(tiny_model),
                "--dataset",
                str(rule_file),
                "--dtype",
                "float32",
                "--methods",
                "0shot,finetuned,finetuned-step8",
                "--checkpoint",
                str(out),
            ]
        )
        == 0
    )
    return out, Store(store)


def test_training_learns_the_rule_and_lowers_the_loss(trained):
    out, store = trained
    record = json.loads((out / RECORD).read_text())
    losses = np.array(record["losses"])
    per_epoch = record["total_steps"] // 12
    assert losses[-per_epoch:].mean() < losses[:per_epoch].mean() - 0.3  # from log(vocab): any letter alike
    held_out = record["accuracy"]
    assert held_out["n_held_out"] == 2 * len(SUBJECTS) and held_out["after"] > held_out["before"] + 0.3
    base, tuned = store.run("tiny-llama", "0shot"), store.run("tiny-llama", "finetuned")
    assert base.accuracy < 0.5 and tuned.accuracy > 0.7  # on questions never trained on (0.815 measured)
    np.testing.assert_array_equal(base.labels()["sample"], tuned.labels()["sample"])
    early = store.run("tiny-llama", "finetuned-step8")
    assert (
        early.attrs["finetune"]["step"] == 8 and early.attrs["recipe"]["checkpoint"]["model_id"] == "sft/checkpoint-8"
    )


def test_only_adapter_weights_change(trained, tiny_model):
    out, _ = trained
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in name or ".lora_B." in name for name in adapter)
    targets = {name.split(".lora_")[0].removeprefix("base_model.model.") for name in adapter}
    assert {t.rsplit(".", 1)[1] for t in targets} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    with peft_quietly():
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).merge_and_unload()
    changed = {
        name.removesuffix(".weight")
        for name, value in merged.state_dict().items()
        if not torch.equal(value, base[name])
    }
    assert changed == targets  # every adapted projection moved, nothing else did
    assert (
        ModelSource.resolve(str(tiny_model)).fingerprint()
        == json.loads((out / RECORD).read_text())["recipe"]["base"]["fingerprint"]
    )  # the base files are untouched


def test_the_loss_is_the_answer_letter_alone(tiny_model):
    """Equal, row by row in a padded batch, to transformers' own loss with every prompt token masked out."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [f"The colour is {c}.\nAnswer:" * (1 + i) for i, c in enumerate(COLOURS)]
    letters = torch.tensor(letter_token_ids(tokenizer))
    ours = letter_losses(model, encode(tokenizer, prompts, torch.device("cpu")), letters)
    for prompt, letter, loss in zip(prompts, letters, ours):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with_letter = torch.cat([ids, letter.view(1, 1)], dim=1)
        only_letter = torch.full_like(with_letter, -100)
        only_letter[0, -1] = letter
        torch.testing.assert_close(loss, model(input_ids=with_letter, labels=only_letter).loss)
        every_token = model(input_ids=with_letter, labels=with_letter).loss
        assert not torch.isclose(loss, every_token)  # the prompt's tokens as targets would change it


def test_subject_weights_make_every_subject_count_alike():
    questions = [
        Question(i, subject, "q", ("a", "b", "c", "d"), "A")
        for i, subject in enumerate(["a"] * 6 + ["b"] * 3 + ["c"] * 1)
    ]
    weights = subject_weights(questions)
    assert weights.mean() == pytest.approx(1.0)
    sums = [weights[[q.subject == s for q in questions]].sum() for s in "abc"]
    assert sums == pytest.approx([sums[0]] * 3)
    assert weights[9] == pytest.approx(6 * weights[0])


def test_training_and_probed_questions_are_disjoint(tiny_model, rule_file, tmp_path, capsys):
    finetune = Finetune(FinetuneOptions(out=tmp_path / "sft", model=str(tiny_model), dataset=str(rule_file)))
    ingest = Ingest(IngestOptions(store=tmp_path / "store", model=str(tiny_model), dataset=str(rule_file)))
    trained_ids = {q.id for q in finetune.questions}
    held_out_ids = {q.id for q in finetune.held_out}
    assert len(trained_ids) == 18 * len(SUBJECTS) and len(held_out_ids) == 2 * len(SUBJECTS)  # 20 held out each
    for ids in (trained_ids, held_out_ids):
        assert not ids & {q.id for q in ingest.selection.queries}
        assert not ids & {q.id for pool in ingest.selection.shot_pool.values() for q in pool}
    assert not trained_ids & held_out_ids

    out = tmp_path / "sft-small"
    assert main(finetune_args(out, tiny_model, rule_file, "--epochs", "1", "--train-pool", "20")) == 0
    # probing with a smaller held-out pool would probe questions the adapter was trained on
    assert (
        main(
            [
                "ingest",
                "--store",
                str(tmp_path / "store"),
                "--model",
                str(tiny_model),
                "--dataset",
                str(rule_file),
                "--train-pool",
                "10",
                "--methods",
                "finetuned",
                "--checkpoint",
                str(out),
            ]
        )
        == 1
    )
    assert "trained on 24 of the questions this run probes" in capsys.readouterr().err  # 8 of 18 per subject
    assert not (tmp_path / "store").exists() or not Store(tmp_path / "store").runs()


def adapter_tensors(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_model, rule_file, tmp_path, capsys):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = ["--epochs", "20", "--save-every", "3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "actstore", *finetune_args(killed, tiny_model, rule_file, *args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint-9").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(AdapterError, match="has not finished"):
        finished_adapter(killed)  # nothing an ingest could pick up
    assert (
        main(
            [
                "ingest",
                "--store",
                str(tmp_path / "store"),
                "--model",
                str(tiny_model),
                "--dataset",
                str(rule_file),
                "--methods",
                "finetuned",
                "--checkpoint",
                str(killed),
            ]
        )
        == 1
    )
    assert "rerun the same actstore finetune command" in capsys.readouterr().err

    # both in fresh processes, as a user reruns it (an in-process run would inherit the test process's
    # torch thread settings, which change float sums in the last bits)
    for out in (killed, clean):
        subprocess.run(
            [sys.executable, "-m", "actstore", *finetune_args(out, tiny_model, rule_file, *args)],
            check=True,
            capture_output=True,
        )
    resumed, uninterrupted = (json.loads((d / RECORD).read_text()) for d in (killed, clean))
    assert resumed["seconds"]["resumed_at_step"] >= 9
    assert resumed["losses"] == uninterrupted["losses"]
    a, b = adapter_tensors(killed), adapter_tensors(clean)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "up to date" in _run_again(killed, tiny_model, rule_file, args, capsys)


def _run_again(out, model, data, args, capsys) -> str:
    capsys.readouterr()
    assert main(finetune_args(out, model, data, *args)) == 0
    return capsys.readouterr().out


def test_bad_input_gets_one_line_and_nothing_is_lost(tiny_model, rule_file, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(finetune_args(out, tiny_model, rule_file, "--epochs", "1")) == 0
    before = adapter_tensors(out)
    cases = [
        (finetune_args(out, tiny_model, rule_file, "--epochs", "2"), "different recipe (hyperparameters)"),
        (finetune_args(tmp_path / "x", tmp_path / "no-such-model", rule_file), "model not found"),
        (finetune_args(tmp_path / "x", tiny_model, rule_file, "--train-pool", "0"), "no training questions"),
        (finetune_args(tiny_model, tiny_model, rule_file), "not empty and holds no fine-tuning record"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(out).items())
    assert main(finetune_args(out, tiny_model, rule_file, "--epochs", "2", "--overwrite")) == 0
    assert json.loads((out / RECORD).read_text())["recipe"]["hyperparameters"]["epochs"] == 2


def test_dry_run_estimates_and_writes_nothing(tiny_model, rule_file, tmp_path, capsys):
    assert main(finetune_args(tmp_path / "sft", tiny_model, rule_file, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "54 training questions from 3 subjects, 28 steps" in out and "estimated time" in out
    assert not (tmp_path / "sft").exists()


def test_provenance_is_served(trained, tmp_path):
    out, store = trained
    record = json.loads((out / RECORD).read_text())
    with ServerProcess(store.url, tmp_path / "server.log") as server, Client(server.address) as client:
        info = client.describe("tiny-llama", "finetuned")
    recipe, finetune = info["recipe"], info["attributes"]["finetune"]
    assert recipe["checkpoint"]["fingerprint"] == record["adapter"]["fingerprint"]
    assert recipe["model_fingerprint"] == record["recipe"]["base"]["fingerprint"]
    assert (
        finetune["recipe"]["hyperparameters"]
        == Hyperparameters(rank=8, learning_rate=3e-3, batch_size=8, epochs=12, subject_header=True).as_dict()
    )
    assert finetune["training"]["ids"] == record["training"]["ids"]
    assert finetune["final_loss"] == pytest.approx(record["final_loss"])


def test_mmlu_csv_layout_trains_on_dev_and_val(tmp_path):
    """With dev/ and val/ splits, training takes at most --train-pool of them per subject and the test split
    keeps every question."""
    from actstore.ingest.datasets import load_dataset
    from actstore.ingest.selection import select

    for split, count in (("test", 30), ("dev", 5), ("val", 25)):
        (tmp_path / split).mkdir()
        for subject in ("anatomy", "virology"):
            rows = "".join(f"{split} {subject} question {i}?,a,b,c,d,{'ABCD'[i % 4]}\n" for i in range(count))
            (tmp_path / split / f"{subject}_{split}.csv").write_text(rows)
    selection = select(load_dataset(tmp_path), train_pool=20)
    assert len(selection.queries) == 60 and selection.train_split == "dev+val"
    assert [q.question.split()[0] for q in selection.train[:20]] == ["dev"] * 5 + ["val"] * 15
    assert len(selection.train) == 40 and {q.subject for q in selection.train} == {"anatomy", "virology"}


def test_fast_dropout_drops_p_of_the_inputs_and_keeps_the_mean():
    from actstore.finetune.precision import FastDropout

    dropout = FastDropout(0.1, np.random.default_rng(0))
    x = torch.ones(1000, 1000, dtype=torch.bfloat16)
    y = dropout(x).float()
    assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.002)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(dropout.eval()(x), x)
    odd = dropout.train()(torch.ones(3, 5, 7, dtype=torch.bfloat16))  # not a whole number of 64-bit words
    assert odd.shape == (3, 5, 7) and not torch.equal(odd, dropout(torch.ones(3, 5, 7, dtype=torch.bfloat16)))
