"""One forward pass per batch: the last prompt token's state at every layer, and the model's answer.

Two sites are offered (docs/explanation/science.md):

* ``residual``: transformers' ``hidden_states``: the embeddings, then each block's output (the last
  entry is after the final norm in Llama-style decoders);
* ``normed``: the input of each block after its input norm, then the final norm's output: what the
  study (Doimo et al. 2024) analysed.

Both give ``n_blocks + 1`` layers from the same single pass.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from actstore.ingest.datasets import LETTERS
from actstore.ingest.model import LoadedModel, ModelError
from actstore.ingest.options import SITES

_INPUT_NORMS = ("input_layernorm", "ln_1", "attention_norm")
_BLOCK_LISTS = ("layers", "h", "blocks")


def letter_token_ids(tokenizer) -> list[int]:
    """The token each answer letter is written as after ``Answer:`` (`` A``), or the bare letter."""
    ids = []
    for letter in LETTERS:
        for text in (" " + letter, letter):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids.append(encoded[0])
                break
        else:
            raise ModelError(f"the tokenizer has no single token for the answer letter {letter!r}")
    return ids


def _decoder_blocks(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    for name in _BLOCK_LISTS:
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return list(blocks)
    raise ModelError(f"cannot find the decoder blocks of {type(decoder).__name__} for site 'normed'")


def _input_norm(block: torch.nn.Module) -> torch.nn.Module:
    for name in _INPUT_NORMS:
        if isinstance(getattr(block, name, None), torch.nn.Module):
            return getattr(block, name)
    raise ModelError(f"cannot find the input norm of {type(block).__name__} for site 'normed'")


@contextmanager
def _capture_last_token(modules: list[torch.nn.Module]):
    """Collect the last-position output of each module during one forward pass."""
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _in, out: captured.append(out[:, -1])) for m in modules]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def encode(
    tokenizer, prompts: list[str], device: torch.device, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded (and, past ``max_length``, left-truncated) token ids, so that the last position is every
    prompt's ``Answer:``; position ids follow the attention mask so padding never shifts a prompt."""
    tokenizer.truncation_side = "left"
    enc = tokenizer(
        prompts, return_tensors="pt", padding=True, truncation=max_length is not None, max_length=max_length
    )
    mask = enc["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": mask.to(device),
        "position_ids": position_ids.to(device),
    }


class StateExtractor:
    """Runs batches of prompts and returns (states, predicted letters).

    Prompts are left-padded so the last position is every prompt's last token; position ids are
    derived from the attention mask so padding never shifts a prompt's positions.
    """

    def __init__(self, loaded: LoadedModel, site: str) -> None:
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
        self.loaded = loaded
        self.site = site
        self.decoder = loaded.model.get_decoder()
        self.head = loaded.model.get_output_embeddings()
        self.letter_ids = letter_token_ids(loaded.tokenizer)
        self._norms = [_input_norm(b) for b in _decoder_blocks(self.decoder)] if site == "normed" else []

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """States as float32 (layer, batch, hidden) and the argmax letter over A/B/C/D per prompt."""
        inputs = encode(self.loaded.tokenizer, prompts, self.loaded.device)
        with _capture_last_token(self._norms) as normed:
            out = self.decoder(**inputs, output_hidden_states=self.site == "residual", use_cache=False)
        last = out.last_hidden_state[:, -1]
        layers = [h[:, -1] for h in out.hidden_states] if self.site == "residual" else [*normed, last]
        states = torch.stack(layers).float().cpu().numpy()
        logits = self.head(last)[:, self.letter_ids]
        predictions = np.asarray(LETTERS)[logits.argmax(-1).cpu().numpy()]
        return states, predictions
