"""Capture (actstore.ingest.capture): every site at every positions mode equals a direct, unbatched forward pass
hooked here in plain torch; batching, row bookkeeping, top-k logits, output dtypes and one-line errors."""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from actstore.ingest.capture import (
    SITES,
    Capture,
    Positions,
    Site,
    check_positions,
    parse_positions,
    resolve_sites,
)
from actstore.ingest.model import LoadedModel, ModelError, ModelSource, load_model
from actstore.store.errors import InvalidName

TEXTS = [
    "The following are multiple choice questions (with answers) about astronomy.",
    "Which planet is the largest?\nA. Mars\nB. Jupiter\nAnswer:",
    "Answer: B",
]
PATTERN = "model.layers.*.mlp.act_fn"
PATTERN_NAME = "model.layers._.mlp.act_fn"
MODES = ["last", "all", "mean", "0,-1,2"]


@pytest.fixture(scope="module")
def loaded(tiny_model) -> LoadedModel:
    return load_model(ModelSource.resolve(str(tiny_model)), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def every_site(loaded) -> list[Site]:
    return resolve_sites(loaded.model, [*SITES, PATTERN])


def chosen(mode: str, n: int) -> list[int]:
    """The positions a mode keeps in a text of n tokens, by hand (indices in increasing position)."""
    if mode == "last":
        return [n - 1]
    if mode == "all":
        return list(range(n))
    return sorted(int(i) % n for i in mode.split(","))


@torch.no_grad()
def direct(loaded: LoadedModel, text: str, mode: str) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Every site's rows for one text run alone (no batch, no padding), with hooks on the named modules, and the
    model's logits (seq, vocab)."""
    model = loaded.model
    reads: dict[str, list[torch.Tensor]] = {name: [] for name in [*SITES, PATTERN_NAME]}

    def keep(name):
        return lambda _module, _args, out: reads[name].append(out[0] if isinstance(out, tuple) else out)

    def keep_input(_module, args, kwargs):
        reads["resid_pre"].append(args[0] if args else kwargs["hidden_states"])

    handles = []
    for block in model.model.layers:
        handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(block.register_forward_hook(keep("resid_post")))
        handles.append(block.self_attn.register_forward_hook(keep("attn_out")))
        handles.append(block.mlp.register_forward_hook(keep("mlp_out")))
        handles.append(block.input_layernorm.register_forward_hook(keep("normed")))
        handles.append(block.mlp.act_fn.register_forward_hook(keep(PATTERN_NAME)))
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    try:
        logits = model(input_ids=ids).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    n = ids.shape[1]
    states = {}
    for name, layers in reads.items():
        assert len(layers) == 3, name
        if mode == "mean":
            rows = [h[0].float().mean(0)[None] for h in layers]
        else:
            rows = [h[0, chosen(mode, n)] for h in layers]
        states[name] = torch.stack(rows).numpy()
    return states, logits


@pytest.mark.parametrize("mode", MODES)
def test_every_site_equals_a_direct_forward_bit_for_bit(loaded, every_site, mode):
    capture = Capture(loaded, every_site, parse_positions(mode))
    for text in TEXTS:
        got = capture([text])
        want, _ = direct(loaded, text, mode)
        assert list(got.states) == [*SITES, PATTERN_NAME]
        for name, values in want.items():
            assert got.states[name].dtype == np.float32
            assert got.states[name].shape == values.shape, name
            assert np.array_equal(got.states[name], values), (name, mode)
    widths = {name: got.states[name].shape[-1] for name in got.states}
    assert widths == {**dict.fromkeys(SITES, 32), PATTERN_NAME: 64}


def expected_rows(mode: str, ids: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    text, position, token = [], [], []
    for i, x in enumerate(ids):
        if mode == "mean":
            text, position, token = [*text, i], [*position, -1], [*token, -1]
            continue
        for p in chosen(mode, len(x)):
            text, position, token = [*text, i], [*position, p], [*token, x[p]]
    return text, position, token


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_equals_its_texts_one_by_one_and_says_where_each_row_is(loaded, every_site, mode):
    capture = Capture(loaded, every_site, parse_positions(mode))
    ids = capture.tokenize(TEXTS)
    assert ids == [loaded.tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(x) for x in ids}) == 3  # padding differs per text

    batched = capture(TEXTS)
    alone = [capture([text]) for text in TEXTS]
    for name, values in batched.states.items():
        one_by_one = np.concatenate([a.states[name] for a in alone], axis=1)
        assert values.shape == one_by_one.shape
        # the random model's states are small (|resid| < 0.1): a tolerance of 1e-5 of their scale, not 1e-5
        assert np.allclose(values, one_by_one, rtol=1e-5, atol=1e-5 * np.abs(one_by_one).max()), name

    text, position, token = expected_rows(mode, ids)
    assert batched.text.tolist() == text
    assert batched.position.tolist() == position
    assert batched.token_id.tolist() == token
    assert batched.n_tokens.tolist() == [len(x) for x in ids]
    for array in (batched.text, batched.position, batched.token_id, batched.n_tokens):
        assert array.dtype == np.int64
    assert batched.top_ids is None and batched.top_logits is None
    per_text = parse_positions(mode).per_text
    assert len(text) == (sum(len(x) for x in ids) if per_text is None else per_text * len(TEXTS))


def test_the_residual_entering_a_block_is_the_one_leaving_the_block_before(loaded, every_site):
    got = Capture(loaded, every_site, Positions("all"))(TEXTS)
    pre, post = got.states["resid_pre"], got.states["resid_post"]
    assert pre.shape == (3, sum(got.n_tokens), 32)
    assert np.array_equal(pre[1:], post[:-1])
    assert not np.allclose(pre, post)
    # resid_post = resid_pre + attn_out + mlp_out, up to float rounding: the sites are what their names say
    assert np.allclose(post, pre + got.states["attn_out"] + got.states["mlp_out"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["last", "0,-1,2", "all"])
def test_top_logits_are_the_models_at_each_rows_position(loaded, every_site, mode):
    capture = Capture(loaded, every_site[:1], parse_positions(mode), top_k=5)
    wanted = []
    for text in TEXTS:
        got = capture([text])
        _, logits = direct(loaded, text, mode)
        top = torch.topk(logits[chosen(mode, logits.shape[0])], 5)
        assert got.top_ids.dtype == np.int64 and got.top_logits.dtype == np.float32
        assert np.array_equal(got.top_ids, top.indices.numpy())
        assert np.allclose(got.top_logits, top.values.numpy(), atol=1e-6, rtol=0)
        wanted.append(top)
    batched = capture(TEXTS)
    assert np.array_equal(batched.top_ids, torch.cat([t.indices for t in wanted]).numpy())
    assert np.allclose(batched.top_logits, torch.cat([t.values for t in wanted]).numpy(), atol=1e-5)


def test_states_come_back_in_the_asked_dtype(loaded, every_site):
    capture = Capture(loaded, every_site, Positions("all"))
    full = capture(TEXTS).states
    bf16 = capture(TEXTS, dtype="bfloat16").states
    half = capture(TEXTS, dtype=np.float16).states
    for name, values in full.items():
        assert bf16[name].dtype == np.float32
        assert np.array_equal(bf16[name], torch.from_numpy(values).to(torch.bfloat16).float().numpy())
        assert not np.array_equal(bf16[name], values)
        assert half[name].dtype == np.float16
        assert np.array_equal(half[name], values.astype(np.float16))
    with pytest.raises(ValueError, match="unknown dtype"):
        capture(TEXTS, dtype="int8")


def test_texts_are_truncated_on_the_right_to_max_tokens(loaded, every_site):
    whole = Capture(loaded, every_site, Positions("all"))
    cut = Capture(loaded, every_site, Positions("all"), max_tokens=4)
    ids = whole.tokenize(TEXTS)
    assert cut.tokenize(TEXTS) == [x[:4] for x in ids]
    got = cut(TEXTS)
    assert got.n_tokens.tolist() == [min(4, len(x)) for x in ids]
    assert got.token_id.tolist() == [t for x in ids for t in x[:4]]
    full = whole(TEXTS)
    first = np.concatenate([np.flatnonzero(full.text == i)[: min(4, len(x))] for i, x in enumerate(ids)])
    for name, values in got.states.items():  # a causal model's prefix does not see what was cut
        assert np.allclose(values, full.states[name][:, first], atol=1e-5), name
    last = Capture(loaded, every_site, Positions("last"), max_tokens=4)([TEXTS[0]])
    assert last.position.tolist() == [3] and last.token_id.tolist() == [ids[0][3]]


def test_positions_are_parsed_and_bad_ones_are_one_line_errors():
    assert parse_positions("last") == Positions("last")
    assert parse_positions(" all ") == Positions("all")
    assert parse_positions("mean").per_text == 1
    assert parse_positions("0,-1,5") == Positions("indices", (0, -1, 5))
    assert parse_positions("0,-1,5").per_text == 3
    assert parse_positions("all").per_text is None and parse_positions("last").per_text == 1
    for bad in ["", "first", "1,,2", "1.5", "0,0", "last,0", "-"]:
        with pytest.raises(ValueError) as error:
            parse_positions(bad)
        assert "\n" not in str(error.value) and "bad positions" in str(error.value)
    with pytest.raises(ValueError):
        Positions("indices")
    with pytest.raises(ValueError):
        Positions("first")


def test_a_position_beyond_a_text_names_the_text_and_its_length(loaded, every_site):
    with pytest.raises(ValueError, match=r"^position 40 is beyond text 3 \(12 tokens\)$"):
        check_positions(parse_positions("0,40"), [50, 50, 50, 12])
    with pytest.raises(ValueError, match=r"^position -13 is beyond text 1 \(12 tokens\)$"):
        check_positions(parse_positions("-13"), [13, 12])
    check_positions(parse_positions("-12,11"), [12, 13])
    with pytest.raises(ValueError, match="text 1 has no tokens"):
        check_positions(Positions("last"), [3, 0])

    capture = Capture(loaded, every_site, parse_positions("0,20"))
    lengths = [len(x) for x in capture.tokenize(TEXTS)]
    short = next(i for i, n in enumerate(lengths) if n <= 20)
    with pytest.raises(ValueError, match=rf"^position 20 is beyond text {short} \({lengths[short]} tokens\)$"):
        capture(TEXTS)


def test_site_errors_are_one_line_and_helpful(loaded):
    with pytest.raises(ModelError) as error:
        resolve_sites(loaded.model, ["model.layers.*.mlp.down_prj"])
    message = str(error.value)
    assert "\n" not in message and "'model.layers.*.mlp.down_prj' matches no module" in message
    suggestions = message.split("close matches: ")[1].split(", ")
    assert suggestions[0] == "model.layers.*.mlp.down_proj" and len(suggestions) <= 5
    assert len(set(suggestions)) == len(suggestions)
    with pytest.raises(ModelError, match="model.layers.*.self_attn.o_proj"):
        resolve_sites(loaded.model, ["model.layers.2.self_attn.o_prj"])

    for specs in (
        ["resid_post", "resid_post"],
        ["a=model.norm", "a=lm_head"],
        ["model.layers.?.mlp", "model.layers.*.mlp"],  # both named model.layers._.mlp
    ):
        with pytest.raises(ModelError, match="two sites are named"):
            resolve_sites(loaded.model, specs)
    with pytest.raises(InvalidName):
        resolve_sites(loaded.model, ["*.mlp"])  # named "_.mlp": a name starts with a letter or digit
    with pytest.raises(InvalidName):
        resolve_sites(loaded.model, ["a/b=model.norm"])

    named = resolve_sites(loaded.model, ["final=model.norm", "model.layers.[02].mlp.down_proj", "pre=resid_pre"])
    assert named == [
        Site("final", ("model.norm",), "output"),
        Site("model.layers._02_.mlp.down_proj", tuple(f"model.layers.{i}.mlp.down_proj" for i in (0, 2)), "output"),
        Site("pre", ("model.layers.0", "model.layers.1", "model.layers.2"), "input"),
    ]
    assert [s.n_layers for s in named] == [1, 2, 3]


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = torch.nn.Linear(4, 4)
        self.input_layernorm = torch.nn.LayerNorm(4)


class Decoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Decoder()


def test_a_per_block_site_the_architecture_lacks_is_an_error():
    toy = Toy()
    assert [s.modules for s in resolve_sites(toy, ["attn_out", "normed"])] == [
        ("model.layers.0.self_attn", "model.layers.1.self_attn"),
        ("model.layers.0.input_layernorm", "model.layers.1.input_layernorm"),
    ]
    with pytest.raises(ModelError, match=r"^site 'mlp_out' needs each block's mlp, and block 0 .*Block.*has none"):
        resolve_sites(toy, ["mlp_out"])
    with pytest.raises(ModelError, match="site 'resid_pre' needs the decoder blocks"):
        resolve_sites(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["resid_pre"])


def test_a_module_giving_no_batch_seq_hidden_tensor_is_named_and_hooks_are_removed(loaded, every_site):
    mlp = loaded.model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda _m, _args, out: out.flatten(0, 1))

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())

    before = hooks()
    capture = Capture(loaded, every_site, Positions("last"))
    try:
        n = len(capture.tokenize(TEXTS[:1])[0])
        with pytest.raises(ModelError, match=rf"^module model.layers.1.mlp returned a tensor of shape \({n}, 32\)"):
            capture(TEXTS[:1])
    finally:
        handle.remove()
    assert hooks() == before - 1
    assert capture(TEXTS[:1]).states["mlp_out"].shape == (3, 1, 32)  # and the capture still works
    with pytest.raises(ValueError, match="logits need token positions"):
        Capture(loaded, every_site, Positions("mean"), top_k=3)


def test_a_gpt2_style_model_has_the_same_sites(loaded):
    torch.manual_seed(0)
    tokenizer = loaded.tokenizer
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    gpt2 = LoadedModel(GPT2LMHeadModel(config).eval(), tokenizer, loaded.source, torch.device("cpu"), torch.float32)
    sites = resolve_sites(gpt2.model, list(SITES))
    assert [s.modules[1] for s in sites] == [
        "transformer.h.1",
        "transformer.h.1",
        "transformer.h.1.attn",
        "transformer.h.1.mlp",
        "transformer.h.1.ln_1",
    ]
    capture = Capture(gpt2, sites, Positions("all"), top_k=2)
    got = capture(TEXTS)
    assert np.array_equal(got.states["resid_pre"][1:], got.states["resid_post"][:-1])
    post = got.states["resid_pre"] + got.states["attn_out"] + got.states["mlp_out"]
    assert np.allclose(got.states["resid_post"], post, rtol=0, atol=1e-6)
    assert got.top_ids.shape == (sum(got.n_tokens), 2)
    # absolute position embeddings: a padded text is right only if its position ids start at its first token
    alone = [capture([text]) for text in TEXTS]
    for name, values in got.states.items():
        one_by_one = np.concatenate([a.states[name] for a in alone], axis=1)
        assert np.allclose(values, one_by_one, rtol=1e-5, atol=1e-5 * np.abs(one_by_one).max()), name
    assert np.array_equal(got.top_ids, np.concatenate([a.top_ids for a in alone]))
