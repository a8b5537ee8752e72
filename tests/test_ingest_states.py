"""Stored states equal a direct, unbatched forward pass of the same prompt, at both sites."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actstore.ingest.datasets import load_dataset
from actstore.ingest.prompts import build_prompt
from actstore.ingest.selection import select
from actstore.store import Store


@torch.no_grad()
def direct_states(model, tokenizer, prompt: str, site: str) -> tuple[np.ndarray, int]:
    """Every layer's last-token state computed without batching, padding or hooks."""
    ids = tokenizer(prompt, return_tensors="pt")
    out = model(**ids, output_hidden_states=True)
    hidden = out.hidden_states
    if site == "residual":
        layers = [h[0, -1] for h in hidden]
    else:  # the input norm of block i applied to the residual entering block i, then the final norm
        blocks = model.model.layers
        layers = [blocks[i].input_layernorm(hidden[i])[0, -1] for i in range(len(blocks))] + [hidden[-1][0, -1]]
    letters = [tokenizer.encode(" " + c, add_special_tokens=False) for c in "ABCD"]
    letter_ids = [
        ids[0] if len(ids) == 1 else tokenizer.encode(c, add_special_tokens=False)[0] for ids, c in zip(letters, "ABCD")
    ]
    prediction = int(out.logits[0, -1, letter_ids].argmax())
    return torch.stack(layers).numpy(), prediction


@pytest.mark.parametrize("site", ["normed", "residual"])
@pytest.mark.parametrize("method", ["0shot", "2shot"])
def test_stored_state_equals_direct_forward(ingest_cli, tiny_model, questions_file, site, method):
    assert ingest_cli("--methods", method, "--site", site) == 0
    run = Store(ingest_cli.store).run("tiny-llama", method)
    states = run.hidden_states[:]
    labels = run.labels()
    n_layers = 3 + 1
    assert states.shape[0] == n_layers and states.shape[2] == 32
    assert run.attrs["recipe"]["site"] == site

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    selection = select(load_dataset(str(questions_file)))
    by_id = {q.id: q for q in selection.queries}
    k = int(method[0])
    checked = 0
    for position in (0, 5, len(labels["sample"]) - 1):  # batches of different padded lengths
        q = by_id[int(labels["sample"][position])]
        prompt = build_prompt(q, selection.shots(q.subject, k), 42)
        expected, prediction = direct_states(model, tokenizer, prompt, site)
        np.testing.assert_allclose(states[:, position], expected, rtol=1e-4, atol=1e-5)
        assert labels["prediction"][position] == "ABCD"[prediction]
        assert labels["subject"][position] == q.subject and labels["answer"][position] == q.answer
        checked += 1
    assert checked == 3
    assert run.accuracy == pytest.approx(np.mean(labels["prediction"] == labels["answer"]))
