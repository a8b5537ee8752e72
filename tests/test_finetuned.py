"""The fine-tuned arm: another checkpoint, probed with the 0-shot prompt, stored under its base model."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from actstore.store import Store


def test_finetuned_checkpoint_is_stored_with_its_base(ingest_cli, tiny_model, tmp_path, capsys):
    checkpoint = tmp_path / "tiny-llama-sft"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).write_bytes((tiny_model / name).read_bytes())

    assert ingest_cli("--methods", "finetuned") == 1
    assert "needs --checkpoint" in capsys.readouterr().err
    assert ingest_cli("--methods", "0shot,finetuned", "--checkpoint", str(checkpoint)) == 0
    store = Store(ingest_cli.store)
    base, tuned = store.run("tiny-llama", "0shot"), store.run("tiny-llama", "finetuned")
    np.testing.assert_array_equal(base.labels()["sample"], tuned.labels()["sample"])  # same questions, same order
    assert not np.allclose(base.hidden_states[1:], tuned.hidden_states[1:])
    recipe = tuned.attrs["recipe"]
    assert recipe["k"] == 0 and recipe["model_id"] == "tiny-llama"
    assert recipe["checkpoint"]["model_id"] == "tiny-llama-sft"
    assert recipe["checkpoint"]["fingerprint"] != recipe["model_fingerprint"]
    assert tuned.attrs["checkpoint_location"] == str(checkpoint)
