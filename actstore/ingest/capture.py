"""Capture any site at any token positions in one forward pass per batch.

A *site* is what a hook reads at every layer: a per-block named site (``SITES``), or any module of the model
chosen by an ``fnmatch`` pattern over ``model.named_modules()`` (``NAME=PATTERN`` names it explicitly).

Per-block sites, layer i = block i:

* ``resid_pre``: the residual stream entering block i (the block's first input);
* ``resid_post``: block i's output;
* ``attn_out``: block i's attention output, before it is added to the residual;
* ``mlp_out``: block i's MLP output, before it is added to the residual;
* ``normed``: block i's input norm output (what ``extract``'s site ``normed`` reads, without the final norm).

So ``resid_pre`` of block i + 1 is ``resid_post`` of block i. *Positions* choose the rows kept per text: its
last token, every token, the mean over its tokens, or given positions (negative from its end). Batches are
left-padded with position ids from the attention mask (as ``extract.encode``), truncated on the right.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
import torch

from actstore.ingest.extract import _BLOCK_LISTS, _INPUT_NORMS
from actstore.ingest.model import LoadedModel, ModelError
from actstore.store.names import validate_name

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "normed")
MODES = ("last", "all", "mean", "indices")
DTYPES = ("float32", "float16", "bfloat16")

# What each per-block site reads: (the block's attributes tried in order, how it is hooked); () = the block itself.
_PARTS: dict[str, tuple[tuple[str, ...], str]] = {
    "resid_pre": ((), "input"),
    "resid_post": ((), "output"),
    "attn_out": (("self_attn", "attn"), "output"),
    "mlp_out": (("mlp",), "output"),
    "normed": (_INPUT_NORMS, "output"),
}
_GLOB = re.compile(r"[*?\[\]]+")
_CLOSE_MATCHES = 5


@dataclass(frozen=True)
class Site:
    name: str  # the stored variable's name: a SITES name, or a module pattern's name
    modules: tuple[str, ...]  # the module names (from model.named_modules()) hooked, one per layer
    hook: str  # "input" (forward pre-hook: the module's first positional input) or "output"

    @property
    def n_layers(self) -> int:
        return len(self.modules)


def _decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The decoder's block list, found as ``extract`` finds it, from the causal LM or the decoder itself."""
    candidates: list[object] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            pass
    candidates += [model, getattr(model, "model", None), getattr(model, "transformer", None)]
    for decoder in candidates:
        if not isinstance(decoder, torch.nn.Module):
            continue
        for name in _BLOCK_LISTS:
            blocks = getattr(decoder, name, None)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
                return list(blocks)
    return None


def _generalized(name: str) -> str:
    """A module name with its layer indices as ``*``: ``model.layers.3.mlp`` -> ``model.layers.*.mlp``."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _block_site(model: torch.nn.Module, name: str, site: str, names: dict[int, str]) -> Site:
    blocks = _decoder_blocks(model)
    if blocks is None:
        raise ModelError(
            f"site {site!r} needs the decoder blocks, and {type(model).__name__} has no block list "
            f"({', '.join(_BLOCK_LISTS)}); name its modules with a pattern instead"
        )
    attrs, hook = _PARTS[site]
    modules = []
    for i, block in enumerate(blocks):
        part = block
        for attr in attrs:
            part = getattr(block, attr, None)
            if isinstance(part, torch.nn.Module):
                break
        if not isinstance(part, torch.nn.Module) or id(part) not in names:
            raise ModelError(
                f"site {site!r} needs each block's {' or '.join(attrs)}, and block {i} of {type(model).__name__} "
                f"({type(block).__name__}) has none; name its modules with a pattern instead"
            )
        modules.append(names[id(part)])
    return Site(name, tuple(modules), hook)


def _pattern_site(model: torch.nn.Module, name: str, pattern: str, all_names: list[str]) -> Site:
    matched = tuple(n for n in all_names if fnmatchcase(n, pattern))
    if matched:
        return Site(name, matched, "output")
    candidates = list(dict.fromkeys(_generalized(n) for n in all_names))
    close = difflib.get_close_matches(_generalized(pattern), candidates, n=_CLOSE_MATCHES, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else f"none of its {len(all_names)} module names is close"
    raise ModelError(f"module pattern {pattern!r} matches no module of {type(model).__name__}; {hint}")


def resolve_sites(model: torch.nn.Module, specs: list[str]) -> list[Site]:
    """Sites for ``specs`` on ``model`` (the causal LM that ``Capture`` will run, ``LoadedModel.model``).

    A spec is a name in ``SITES``, or an ``fnmatch`` pattern over the names of ``model.named_modules()`` (each
    match a layer, in that order, hooked on its output), optionally named ``NAME=PATTERN``; without a name, a
    pattern's name is the pattern with each run of ``*?[]`` as ``_``. ``NAME=SITE`` renames a per-block site.
    """
    if not specs:
        raise ModelError("no sites asked for")
    names = {id(module): name for name, module in model.named_modules()}
    all_names = [name for name in names.values() if name]
    sites: list[Site] = []
    given: dict[str, str] = {}
    for raw in specs:
        spec = raw.strip()
        name, sep, pattern = spec.partition("=")
        if not sep:
            pattern = spec
            name = spec if spec in SITES else _GLOB.sub("_", spec)
        name, pattern = name.strip(), pattern.strip()
        validate_name(name, "site name")
        if name in given:
            raise ModelError(f"two sites are named {name!r} ({given[name]!r} and {raw!r}); name one with NAME=PATTERN")
        given[name] = raw
        if pattern in SITES:
            sites.append(_block_site(model, name, pattern, names))
        else:
            sites.append(_pattern_site(model, name, pattern, all_names))
    return sites


@dataclass(frozen=True)
class Positions:
    mode: str  # "last", "all", "mean" or "indices"
    indices: tuple[int, ...] = ()  # for "indices": positions in the text, negative from its end

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown positions mode {self.mode!r}; choose from {', '.join(MODES)}")
        if (self.mode == "indices") != bool(self.indices):
            raise ValueError("positions: indices go with mode 'indices', and it needs at least one")
        if len(set(self.indices)) != len(self.indices):
            raise ValueError(f"positions: an index is given twice in {','.join(map(str, self.indices))}")

    @property
    def per_text(self) -> int | None:
        """Rows per text: 1 for last and mean, one per index, None for all (a text's length)."""
        if self.mode == "all":
            return None
        return len(self.indices) if self.mode == "indices" else 1


def parse_positions(text: str) -> Positions:
    """``last``, ``all``, ``mean``, or comma-separated token positions such as ``0,-1,5`` (negative from the end)."""
    value = text.strip()
    if value in ("last", "all", "mean"):
        return Positions(value)
    try:
        indices = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise ValueError(
            f"bad positions {text!r}: use last, all, mean or comma-separated token positions such as 0,-1,5"
        ) from None
    if len(set(indices)) != len(indices):
        raise ValueError(f"bad positions {text!r}: a position is given twice")
    return Positions("indices", indices)


def check_positions(positions: Positions, lengths: list[int], names: list[str] | None = None) -> None:
    """Raise ValueError naming the first text that the positions do not fit: by ``names`` (how the caller's
    user knows the texts), else by its index in ``lengths``."""
    for i, n in enumerate(lengths):
        text = names[i] if names is not None else f"text {i}"
        if n < 1:
            raise ValueError(f"{text} has no tokens")
        for index in positions.indices:
            if not -n <= index < n:
                raise ValueError(f"position {index} is beyond {text} ({n} tokens)")


@dataclass
class Captured:
    states: dict[str, np.ndarray]  # per site name: (layer, rows, d) in the asked numpy dtype
    text: np.ndarray  # (rows,) int64: index of the row's text within the batch
    position: np.ndarray  # (rows,) int64: the token's position in its text (0 = its first token); -1 for "mean"
    token_id: np.ndarray  # (rows,) int64: the token's id; -1 for "mean"
    n_tokens: np.ndarray  # (batch,) int64: each text's length in tokens
    top_ids: np.ndarray | None  # (rows, k) int64 ids of the k largest next-token logits at the row's position
    top_logits: np.ndarray | None  # (rows, k) float32 those logits
    logits: np.ndarray | None = None  # (rows, len(logit_ids)) float32 the next-token logits of Capture.logit_ids


def _dtype_name(dtype: np.dtype | str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype
    else:
        name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} for captured states; choose from {', '.join(DTYPES)}")
    return name


def _states(name: str, value: object, batch: int, seq: int) -> torch.Tensor:
    """A hooked value as (batch, seq, d): a tuple's first element, else a one-line error naming the module."""
    if isinstance(value, tuple | list) and value:
        value = value[0]
    if isinstance(value, torch.Tensor) and value.dim() == 3 and tuple(value.shape[:2]) == (batch, seq):
        return value
    what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    raise ModelError(f"module {name} returned {what}, not a tensor of shape (batch={batch}, seq={seq}, d)")


class _Rows:
    """Which (text, column) of a left-padded batch each captured row reads: built once per batch."""

    def __init__(self, positions: Positions, lengths: np.ndarray, seq: int, device: torch.device) -> None:
        batch = len(lengths)
        pad = seq - lengths
        self.mode = positions.mode
        self.pads = pad.tolist()
        if self.mode in ("last", "mean"):
            self.text = np.arange(batch, dtype=np.int64)
            self.position = lengths - 1
        elif self.mode == "all":
            self.text = np.repeat(np.arange(batch, dtype=np.int64), lengths)
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
            self.position = np.arange(len(self.text), dtype=np.int64) - starts
        else:
            asked = np.asarray(positions.indices, dtype=np.int64)
            within = np.where(asked >= 0, asked, lengths[:, None] + asked)  # (batch, indices)
            self.text = np.repeat(np.arange(batch, dtype=np.int64), len(asked))
            self.position = np.sort(within, axis=1).reshape(-1)
        self.column = pad[self.text] + self.position
        self._text = torch.from_numpy(self.text).to(device)
        self._column = torch.from_numpy(self.column).to(device)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, seq, d) -> (rows, d); for "mean" the float32 mean over each text's tokens."""
        if self.mode == "mean":
            return torch.stack([hidden[i, pad:].float().mean(0) for i, pad in enumerate(self.pads)])
        return hidden[self._text, self._column]


class Capture:
    """Runs batches of texts once each through the model with every site hooked; returns the chosen rows.

    Without ``top_k`` only the decoder runs (the causal LM if a site's module lies outside it); with it, the
    whole causal LM, its logits kept only from the earliest position a row needs.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        sites: list[Site],
        positions: Positions,
        top_k: int = 0,
        max_tokens: int | None = None,
        logit_ids: tuple[int, ...] = (),
    ) -> None:
        if not sites:
            raise ModelError("no sites asked for")
        if len({site.name for site in sites}) != len(sites):
            raise ModelError(f"two sites share a name in {', '.join(site.name for site in sites)}")
        if top_k < 0:
            raise ValueError(f"top_k must be 0 or more, not {top_k}")
        if (top_k or logit_ids) and positions.mode == "mean":
            raise ValueError("logits need token positions: positions 'mean' has none")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be 1 or more, not {max_tokens}")
        self.loaded = loaded
        self.sites = list(sites)
        self.positions = positions
        self.top_k = top_k
        self.logit_ids = tuple(logit_ids)  # tokens whose next-token logits every row keeps (the answer letters)
        self.max_tokens = max_tokens
        named = dict(loaded.model.named_modules())
        self._modules: list[list[torch.nn.Module]] = []
        for site in self.sites:
            if site.hook not in ("input", "output"):
                raise ModelError(f"site {site.name!r} has hook {site.hook!r}; use 'input' or 'output'")
            missing = [name for name in site.modules if name not in named]
            if missing or not site.modules:
                raise ModelError(
                    f"site {site.name!r} names module {missing[0] if missing else '(none)'!r}, which "
                    f"{type(loaded.model).__name__} lacks (resolve sites on LoadedModel.model)"
                )
            self._modules.append([named[name] for name in site.modules])
        decoder = loaded.model.get_decoder()
        inside = {id(module) for module in decoder.modules()}
        outside = any(id(m) not in inside for modules in self._modules for m in modules)
        logits = bool(top_k or logit_ids)
        self._runner = loaded.model if logits or outside else decoder
        parameters = inspect.signature(loaded.model.forward).parameters
        keep = [name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters]
        self._keep_argument = keep[0] if logits and keep and not outside else None  # a hooked lm_head needs all

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """The ids each text is captured over: the tokenizer's defaults (its special tokens included), truncated
        on the right to ``max_tokens``."""
        tokenizer = self.loaded.tokenizer
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "right"
        try:
            encoded = tokenizer(list(texts), truncation=self.max_tokens is not None, max_length=self.max_tokens)
        finally:
            tokenizer.truncation_side = side
        return [list(ids) for ids in encoded["input_ids"]]

    def __call__(self, texts: list[str], dtype: np.dtype | str = "float32") -> Captured:
        """One forward pass over ``texts`` (one batch): the rows the positions choose, at every site and layer."""
        dtype_name = _dtype_name(dtype)
        if not texts:
            raise ValueError("no texts to capture")
        ids = self.tokenize(texts)
        lengths = np.asarray([len(x) for x in ids], dtype=np.int64)
        check_positions(self.positions, lengths.tolist())
        batch, seq = len(ids), int(lengths.max())
        pad_id = self.loaded.tokenizer.pad_token_id
        input_ids = np.full((batch, seq), 0 if pad_id is None else pad_id, dtype=np.int64)
        mask = np.zeros((batch, seq), dtype=np.int64)
        for i, x in enumerate(ids):
            input_ids[i, seq - len(x) :] = x
            mask[i, seq - len(x) :] = 1
        device = self.loaded.device
        rows = _Rows(self.positions, lengths, seq, device)
        inputs = {
            "input_ids": torch.from_numpy(input_ids).to(device),
            "attention_mask": torch.from_numpy(mask).to(device),
            "position_ids": torch.from_numpy((mask.cumsum(-1) - 1).clip(min=0)).to(device),
            "use_cache": False,
        }
        if self._keep_argument:
            inputs[self._keep_argument] = seq - int(rows.column.min())
        gathered, logits = self._forward(inputs, rows, batch, seq)

        states = {}
        for site, layers in zip(self.sites, gathered, strict=True):
            widths = {tuple(layer.shape) for layer in layers}
            if len(widths) > 1:
                raise ModelError(f"site {site.name!r}: its modules give rows of different shapes {sorted(widths)}")
            values = torch.stack(layers).float()
            if dtype_name == "bfloat16":
                values = values.to(torch.bfloat16).float()
            array = values.cpu().numpy()
            states[site.name] = array.astype(np.float16) if dtype_name == "float16" else array

        top_ids = top_logits = chosen = None
        if logits is not None:
            offset = seq - logits.shape[1]  # logits are kept for the last positions only
            at_rows = logits[rows._text, rows._column - offset]
            if self.logit_ids:
                chosen = at_rows[:, list(self.logit_ids)].float().cpu().numpy()
        if self.top_k:
            if self.top_k > logits.shape[-1]:
                raise ValueError(f"top_k {self.top_k} is more than the model's {logits.shape[-1]} logits")
            top = at_rows.topk(self.top_k, dim=-1)
            top_ids = top.indices.cpu().numpy().astype(np.int64)
            top_logits = top.values.float().cpu().numpy()
        mean = self.positions.mode == "mean"
        return Captured(
            states=states,
            text=rows.text.copy(),
            position=np.full(batch, -1, dtype=np.int64) if mean else rows.position.astype(np.int64),
            token_id=np.full(batch, -1, dtype=np.int64) if mean else input_ids[rows.text, rows.column],
            n_tokens=lengths,
            top_ids=top_ids,
            top_logits=top_logits,
            logits=chosen,
        )

    def _forward(
        self, inputs: dict, rows: _Rows, batch: int, seq: int
    ) -> tuple[list[list[torch.Tensor]], torch.Tensor | None]:
        """Run once with every site hooked (hooks removed whatever happens); each hook keeps only its rows."""
        slots: list[list[list[torch.Tensor]]] = [[[] for _ in modules] for modules in self._modules]

        def reader(name: str, slot: list[torch.Tensor]) -> Callable:
            def read(value: object) -> None:
                slot.append(rows(_states(name, value, batch, seq)))

            return read

        handles = []
        try:
            for site, modules, site_slots in zip(self.sites, self._modules, slots, strict=True):
                for name, module, slot in zip(site.modules, modules, site_slots, strict=True):
                    read = reader(name, slot)
                    if site.hook == "input":
                        hook = _input_hook(name, read)
                        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                    else:
                        handles.append(module.register_forward_hook(lambda _m, _args, out, read=read: read(out)))
            with torch.inference_mode():
                out = self._runner(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        for site, site_slots in zip(self.sites, slots, strict=True):
            for name, slot in zip(site.modules, site_slots, strict=True):
                if len(slot) != 1:
                    ran = "did not run" if not slot else f"ran {len(slot)} times"
                    raise ModelError(f"module {name} (site {site.name!r}) {ran} in one forward pass; it must run once")
        gathered = [[slot[0] for slot in site_slots] for site_slots in slots]
        return gathered, out.logits if self.top_k or self.logit_ids else None


def _input_hook(name: str, read: Callable[[object], None]) -> Callable:
    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            read(args[0])
        elif "hidden_states" in kwargs:
            read(kwargs["hidden_states"])
        else:
            raise ModelError(f"module {name} was called without a positional input or hidden_states")

    return hook
