"""Capture runs served: a real server on a real port, a real client and `actstore query`. Every site of a token
run and of a one-row-per-text run reads back equal to the store bit for bit, with its dims and row coordinates;
each way of choosing rows (sample ids, labels, token positions, a row range) takes exactly the rows a numpy
selection over ``run.labels()`` takes; float16 runs come back as float16; bad requests get one precise status
and one line from the shell; a private capture run is hidden from other groups exactly as a question run is."""

from __future__ import annotations

import dataclasses
import json

import grpc
import numpy as np
import pytest
import xarray as xr

from actstore import testing
from actstore.cli import main
from actstore.client import ActstoreError, Client
from actstore.client.channel import CLIENT_OPTIONS
from actstore.server.process import ServerProcess
from actstore.store import Store, layout
from actstore.store.capture import CaptureLayout
from actstore.testing import make_questions, write_jsonl
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc

TOKENS = {"tok-a-at-least-16-chars": "lab-a", "tok-b-at-least-16-chars": "lab-b"}
SITES = "resid_post,mlp_out,act=model.layers.*.mlp.act_fn"
RUNS = {"tok": ("--positions", "all"), "last": ("--positions", "last"), "f16": ("--positions", "all")}
SYNTHETIC = ("synthetic", "0shot")  # a capture run written through the store: larger, labels of every dtype
SYNTHETIC_F16 = ("synthetic", "f16")  # the same rows, stored as float16
S = grpc.StatusCode


def write_large_capture(root) -> None:
    """~6,000 token rows of two sites (64 and 96 wide) with float64, bool and str labels: reads above the
    stream's message size, forwarded as stored Blosc chunks or gathered."""
    capture = CaptureLayout(
        rows="token",
        n_layers=2,
        hidden=64,
        sites={"resid_post": 64, "wide": 96},
        labels={"score": "float64", "flag": "bool", "tag": "str"},
    )
    lengths = np.random.default_rng(0).integers(20, 80, size=120)
    testing.write_synthetic_capture(Store(root), *SYNTHETIC, capture, lengths, commits=4, seed=1)
    half = dataclasses.replace(capture, store_dtype="float16")
    testing.write_synthetic_capture(Store(root), *SYNTHETIC_F16, half, lengths, commits=4, seed=1)


@pytest.fixture(scope="module")
def capture_served(tmp_path_factory, tiny_model, questions_file):
    root = tmp_path_factory.mktemp("capture-served")
    store = root / "store"
    questions = make_questions(2)
    rows = [questions[i] for i in (0, 1, 2, 3, 4, 40, 41, 42, 80, 81, 82)]  # three topics
    texts = write_jsonl(
        root / "texts.jsonl", [{"text": r["question"], "topic": r["topic"], "n": i % 3} for i, r in enumerate(rows)]
    )
    with pytest.MonkeyPatch.context() as mp:  # small chunks, so that the tiny runs span many (conftest's)
        mp.setattr(layout, "INNER_CHUNK_BYTES", 8 * 4 * 32)
        mp.setattr(layout, "SHARD_BYTES", 32 * 4 * 32)
        common = ["--text-column", "text", "--label-columns", "topic,n", "--sites", SITES]
        for name, extra in RUNS.items():
            dtype = ["--store-dtype", "float16"] if name == "f16" else []
            assert main(testing.ingest_args(store, tiny_model, texts, *common, *extra, *dtype, "--name", name)) == 0
        private = ["--positions", "last", "--name", "secret", "--group", "lab-a"]
        assert main(testing.ingest_args(store, tiny_model, texts, *common, *private)) == 0
        question = ["--methods", "0shot", "--name", "questions", "--group", "lab-a", "--limit", "6"]
        assert main(testing.ingest_args(store, tiny_model, questions_file, *question)) == 0
    write_large_capture(store)
    auth = root / "auth.toml"
    auth.write_text("[tokens]\n" + "".join(f'"{t}" = "{g}"\n' for t, g in TOKENS.items()))
    server = ServerProcess(store, root / "server.log", "--auth", str(auth))
    yield server, Store(store)
    server.stop()


def client(server, token="tok-a-at-least-16-chars") -> Client:
    return Client(server.address, token=token)


def refusal(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ActstoreError) as caught:
        call()
    return caught.value.code, caught.value.message


def numpy_rows(labels: dict, samples=None, positions=None, tokens=None, **filters) -> np.ndarray:
    """The rows a selection takes, by plain numpy over the run's labels: the texts' rows in the order asked,
    or a range; then at the token positions (negative from each text's end), and with the label values."""
    sample, position = labels["sample"], labels["position"]
    if samples is not None:
        rows = np.concatenate([np.flatnonzero(sample == s) for s in samples])
    else:
        rows = np.arange(len(sample))[tokens if tokens is not None else slice(None)]
    keep = np.ones(len(rows), dtype=bool)
    if positions is not None:
        length = {s: position[sample == s].max() + 1 for s in np.unique(sample)}
        keep &= [any(position[r] == (p if p >= 0 else length[sample[r]] + p) for p in positions) for r in rows]
    for name, values in filters.items():
        values = [values] if np.ndim(values) == 0 else values
        keep &= np.isin([str(v) for v in labels[name][rows]], [str(v) for v in values])
    return rows[keep]


def assert_equals_store(got: xr.DataArray, run, site: str, layers: list[int], rows: np.ndarray) -> None:
    want = run.read_states(layers, site=site)[:, rows]
    assert got.dtype == want.dtype and got.values.tobytes() == want.tobytes()  # bit for bit
    assert got.name == site and got.dims == ("layer", run.row_dim, run.capture.width_dim(site))
    assert got["layer"].values.tolist() == layers
    assert got[got.dims[2]].values.tolist() == list(range(want.shape[2]))
    for name, values in run.labels().items():
        assert got[name].dims == (run.row_dim,)
        np.testing.assert_array_equal(got[name].values, values[rows])


@pytest.mark.parametrize("name", ["tok", "last", "f16"])
def test_every_site_reads_back_equal_to_the_store(capture_served, name):
    server, store = capture_served
    run = store.run(name, "0shot")
    everything = np.arange(run.n_samples)
    with client(server) as c:
        for site in run.sites:
            assert_equals_store(c.hidden_states(name, "0shot", site=site), run, site, [0, 1, 2], everything)
        assert_equals_store(c.hidden_states(name, "0shot", layers=[2, 0]), run, "resid_post", [2, 0], everything)
        if name == "f16":  # float16 as stored, or widened exactly to float32 when asked
            wide = c.hidden_states(name, "0shot", site="act", dtype="float32")
            assert wide.dtype == np.float32
            np.testing.assert_array_equal(wide.values, run.read_states([0, 1, 2], site="act").astype(np.float32))


SELECTIONS = {
    "tok": [
        {"samples": [7, 0, 4]},
        {"topic": "astronomy"},
        {"n": [1, 2]},
        {"positions": [0]},
        {"positions": [-1, 2, -3]},
        {"tokens": slice(5, 41)},
        {"tokens": slice(30, 90), "positions": [-1], "topic": ["anatomy", "college biology"]},
        {"samples": [9, 1], "positions": [1, -2], "n": 1},
    ],
    "last": [
        {"samples": [3, 8, 0]},
        {"topic": "college biology"},
        {"positions": [-1]},
        {"tokens": slice(2, 7)},
        {"samples": slice(1, 4)},
        {"tokens": slice(0, 11), "n": [0, 2], "topic": "anatomy"},
    ],
}
CASES = [(name, kwargs) for name, selections in SELECTIONS.items() for kwargs in selections]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{'-'.join(k)}" for n, k in CASES])
def test_each_selection_takes_exactly_the_rows_numpy_takes(capture_served, name, kwargs):
    server, store = capture_served
    run = store.run(name, "0shot")
    numpy_kwargs = dict(kwargs)
    if isinstance(kwargs.get("samples"), slice):  # a sample position range: rows, where they are samples
        numpy_kwargs["tokens"] = numpy_kwargs.pop("samples")
    rows = numpy_rows(run.labels(), **numpy_kwargs)
    assert 0 < len(rows) < run.n_samples or "positions" in kwargs
    with client(server) as c:
        got = c.hidden_states(name, "0shot", site="act", layers=[0, 2], **kwargs)
        labels = c.labels(name, "0shot", **kwargs)
    assert_equals_store(got, run, "act", [0, 2], rows)
    for coord, values in run.labels().items():
        np.testing.assert_array_equal(labels[coord].values, values[rows])


def test_large_reads_stream_as_stored_chunks_or_gathered_and_every_label_dtype_filters(capture_served):
    server, store = capture_served
    run = store.run(*SYNTHETIC)
    labels = run.labels()
    with client(server) as c:
        whole = c.hidden_states(*SYNTHETIC, site="wide")  # 2 layers x 6,000 rows x 96: Blosc blocks
        assert_equals_store(whole, run, "wide", [0, 1], np.arange(run.n_samples))
        edges = c.hidden_states(*SYNTHETIC, tokens=slice(7, run.n_samples - 5))  # partial chunks at both ends
        assert_equals_store(edges, run, "resid_post", [0, 1], np.arange(7, run.n_samples - 5))
        texts = [int(s) for s in np.unique(labels["sample"])[::-3]]
        for kwargs in ({"samples": texts}, {"flag": True, "score": [0.5, 1.5]}, {"tag": "t3", "positions": [-1, 0]}):
            got = c.hidden_states(*SYNTHETIC, site="wide", **kwargs)
            assert_equals_store(got, run, "wide", [0, 1], numpy_rows(labels, **kwargs))
        assert got["flag"].dtype == bool and got["score"].dtype == np.float64 and got["tag"].dtype.kind == "U"
        code, message = refusal(lambda: c.hidden_states(*SYNTHETIC, layers=0, dtype="float16"))
        assert code == S.FAILED_PRECONDITION and "float16 would change values" in message  # never rounded silently


def test_an_answer_is_decoded_into_the_callers_array_when_it_fits(capture_served):
    """``out`` receives the answer, blocks and raw ends alike, and the DataArray wraps it; an array of another
    shape, dtype or layout is refused in one line, and the connection serves the next call."""
    server, store = capture_served
    run = store.run(*SYNTHETIC_F16)
    rows = slice(7, run.n_samples - 5)  # stored chunks and partial ones at both ends
    taken = np.arange(run.n_samples)[rows]
    with client(server) as c:
        out = np.full((2, rows.stop - rows.start, 96), np.nan, dtype=np.float16)
        got = c.hidden_states(*SYNTHETIC_F16, site="wide", tokens=rows, out=out)
        assert np.shares_memory(got.values, out)
        assert_equals_store(got, run, "wide", [0, 1], taken)
        for wrong, words in (
            (np.empty((2, 10, 96), np.float16), r"out is float16 \(2, 10, 96\); the answer is float16 \(2, \d+, 96\)"),
            (np.empty(out.shape, np.float32), "out is float32"),
            (np.empty(out.shape[::-1], np.float16).T, "not C-contiguous"),
        ):
            with pytest.raises(ValueError, match=words):
                c.hidden_states(*SYNTHETIC_F16, site="wide", tokens=rows, out=wrong)
        assert_equals_store(c.hidden_states(*SYNTHETIC_F16, site="wide", tokens=rows), run, "wide", [0, 1], taken)


def test_float16_states_stream_as_stored_chunks_to_a_client_that_decodes_them(capture_served):
    """A float16 run read as stored travels as its Blosc chunks, decoded by the client bit for bit; a client
    that decodes only float32 blocks (accept_blosc alone, as before float16 blocks) gets raw bytes."""
    server, store = capture_served
    run = store.run(*SYNTHETIC_F16)
    with client(server) as c:
        got = c.hidden_states(*SYNTHETIC_F16, site="wide")
    assert_equals_store(got, run, "wide", [0, 1], np.arange(run.n_samples))
    assert got.dtype == np.float16
    metadata = (("authorization", "Bearer tok-a-at-least-16-chars"),)
    with grpc.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel:
        read = pb_grpc.DataServiceStub(channel).ReadStates
        request = pb.ReadStatesRequest(run=pb.RunRef(model=SYNTHETIC_F16[0], method=SYNTHETIC_F16[1]), site="wide")
        request.accept_blosc = True
        older = list(read(request, metadata=metadata, timeout=30))
        request.accept_blosc_float16 = True
        newer = list(read(request, metadata=metadata, timeout=30))
    assert not any(m.blocks for m in older)
    blocks = [b for m in newer for b in m.blocks]
    assert sum(b.n_samples for b in blocks) > 0.9 * 2 * run.n_samples  # all but the last, partial chunks
    assert sum(len(b.blosc) for b in blocks) < got.nbytes  # stored compressed: fewer bytes than raw float16
    raw = b"".join(m.chunk.data for m in older)
    assert raw == got.values.tobytes()


def test_query_get_writes_the_site_with_its_coordinates(capture_served, tmp_path, monkeypatch, capsys):
    server, store = capture_served
    monkeypatch.setenv("ACTSTORE_TOKEN", "tok-a-at-least-16-chars")
    query = ["query", "--address", server.address, "get"]
    cases = [
        ("tok", ["--site", "act", "--layers", "0,2", "--token-positions", "0,-1", "--label", "topic=astronomy"]),
        ("last", ["--site", "mlp_out", "--layers", "1:3", "--tokens", "2:9", "--label", "n=0,2"]),
        ("f16", ["--tokens", "10:60"]),
    ]
    for name, options in cases:
        run = store.run(name, "0shot")
        out = tmp_path / f"{name}.nc"
        assert main([*query, name, "0shot", *options, "--out", str(out)]) == 0
        assert str(out) in capsys.readouterr().out
        site = options[options.index("--site") + 1] if "--site" in options else "resid_post"
        layers = {"tok": [0, 2], "last": [1, 2], "f16": [0, 1, 2]}[name]
        kwargs = {"tok": {"positions": [0, -1], "topic": "astronomy"}, "last": {"tokens": slice(2, 9), "n": [0, 2]}}
        rows = numpy_rows(run.labels(), **kwargs.get(name, {"tokens": slice(10, 60)}))
        want = run.read_states(layers, site=site)[:, rows]
        with xr.open_dataset(out) as saved:
            assert list(saved.data_vars) == [site]
            assert saved[site].dims == ("layer", run.row_dim, run.capture.width_dim(site))
            assert saved[site].dtype == np.float32  # float16 written as float32 (NetCDF 3 has none), exactly
            np.testing.assert_array_equal(saved[site].values, want.astype(np.float32))
            for coord, values in run.labels().items():
                np.testing.assert_array_equal(saved[coord].values, values[rows])
            assert json.loads(saved.attrs["recipe"]) == run.attrs["recipe"]
            assert saved[site].attrs.get("stored_dtype") == ("float16" if name == "f16" else None)
    npy = tmp_path / "tok.npy"
    assert main([*query, "tok", "0shot", "--site", "mlp_out", "--token-positions", "-1", "--out", str(npy)]) == 0
    run = store.run("tok", "0shot")
    np.testing.assert_array_equal(
        np.load(npy), run.read_states([0, 1, 2], site="mlp_out")[:, numpy_rows(run.labels(), positions=[-1])]
    )


BAD = [
    ("tok", {"site": "nope"}, S.INVALID_ARGUMENT, "no site 'nope'; its sites: resid_post, mlp_out, act"),
    ("tok", {"tokens": slice(190, 5000)}, S.INVALID_ARGUMENT, "token range 190:5000 is empty or outside the"),
    ("tok", {"samples": slice(0, 3)}, S.INVALID_ARGUMENT, "give a range of its rows as token_range"),
    ("tok", {"positions": [900]}, S.INVALID_ARGUMENT, "no row of run tok/0shot is at token position 900"),
    ("tok", {"positions": [0, 0]}, S.INVALID_ARGUMENT, "asked for more than once"),
    ("tok", {"mood": "happy"}, S.INVALID_ARGUMENT, "unknown label 'mood'; filter on sample, position, token_id"),
    ("tok", {"topic": "alchemy"}, S.INVALID_ARGUMENT, "matches no row"),
    ("tok", {"samples": [10**6]}, S.NOT_FOUND, "not in this run"),
    ("tok", {"rows": [0, 10**6]}, S.INVALID_ARGUMENT, "1 row(s) outside the"),
    ("tok", {"rows": [0], "tokens": slice(0, 5)}, S.INVALID_ARGUMENT, "or rows: one of them"),
    ("last", {"positions": [0]}, S.INVALID_ARGUMENT, "no row of run last/0shot is at token position 0"),
    ("last", {"positions": [-2]}, S.INVALID_ARGUMENT, "at token position -2: it holds positions 'last'"),
    ("questions", {"positions": [0]}, S.INVALID_ARGUMENT, "holds one row per question"),
    ("questions", {"rows": [0]}, S.INVALID_ARGUMENT, "holds one row per question"),
    ("questions", {"site": "mlp_out"}, S.INVALID_ARGUMENT, "no site 'mlp_out'"),
]


@pytest.mark.parametrize(("name", "kwargs", "code", "words"), BAD, ids=[f"{b[0]}-{next(iter(b[1]))}" for b in BAD])
def test_bad_requests_get_one_precise_status(capture_served, name, kwargs, code, words):
    server, _ = capture_served
    with client(server) as c:
        got = refusal(lambda: c.hidden_states(name, "0shot", **kwargs))
        assert got[0] == code and words in got[1], got
        if "site" not in kwargs:
            assert refusal(lambda: c.labels(name, "0shot", **kwargs)) == got
        assert c.hidden_states("tok", "0shot", layers=0).sizes["token"] > 0  # the server keeps serving


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--site", "nope"], "INVALID_ARGUMENT: run tok/0shot has no site 'nope'"),
        (["--tokens", "0:5000"], "INVALID_ARGUMENT: token range 0:5000"),
        (["--token-positions", "one"], "expected a comma list of integers"),
    ],
)
def test_the_shell_says_a_bad_request_in_one_line(capture_served, tmp_path, monkeypatch, capsys, options, words):
    server, _ = capture_served
    monkeypatch.setenv("ACTSTORE_TOKEN", "tok-a-at-least-16-chars")
    out = tmp_path / "x.nc"
    argv = ["query", "--address", server.address, "get", "tok", "0shot", *options, "--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: usage, then one error line
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and words in err[-1] and not out.exists()
    assert len(err) == 1 or err[-1].startswith("actstore query get: error:")


def test_a_private_capture_run_is_hidden_from_other_groups_like_a_question_run(capture_served):
    server, _ = capture_served
    with client(server, token="tok-b-at-least-16-chars") as b:
        listed = {(r["model"], r["method"]) for r in b.runs()}
        assert listed == {(n, "0shot") for n in [*RUNS, "synthetic"]} | {SYNTHETIC_F16}
        for call in (b.describe, b.labels, lambda *run: b.hidden_states(*run, layers=0)):
            capture = refusal(lambda: call("secret", "0shot"))
            question = refusal(lambda: call("questions", "0shot"))
            absent = refusal(lambda: call("nothing", "0shot"))
            assert capture[0] == question[0] == absent[0] == S.NOT_FOUND
            assert (
                capture[1].replace("secret", "?")
                == question[1].replace("questions", "?")
                == absent[1].replace("nothing", "?")
            )
        assert refusal(lambda: b.hidden_states("secret", "0shot", site="nope"))[0] == S.NOT_FOUND  # nothing told
    with client(server) as a:  # its owner reads it
        assert a.hidden_states("secret", "0shot", site="mlp_out").sizes["sample"] == 11


def test_the_catalog_tells_capture_runs_apart(capture_served, monkeypatch, capsys):
    server, store = capture_served
    with client(server) as c:
        listed = {r["model"]: r for r in c.runs()}
        tok, last = c.describe("tok", "0shot"), listed["last"]
        question = listed["questions"]
    run = store.run("tok", "0shot")
    assert tok["kind"] == "capture" and tok["row_dim"] == "token" and tok["n_texts"] == 11
    assert tok["n_samples"] == run.n_samples > 11 and tok["store_dtype"] == "float32" and tok["dtype"] == "float32"
    assert tok["sites"] == [
        {"name": "resid_post", "n_layers": 3, "width": 32, "dims": ["layer", "token", "hidden"]},
        {"name": "mlp_out", "n_layers": 3, "width": 32, "dims": ["layer", "token", "hidden"]},
        {"name": "act", "n_layers": 3, "width": 64, "dims": ["layer", "token", "act.hidden"]},
    ]
    assert tok["labels"] == {"topic": ["anatomy", "astronomy", "college biology"], "n": ["0", "1", "2"]}
    assert last["row_dim"] == "sample" and last["n_samples"] == last["n_texts"] == 11
    assert listed["f16"]["store_dtype"] == "float16"
    assert question["kind"] == "questions" and question["row_dim"] == "sample" and question["n_texts"] == 6
    assert question["sites"] == [{"name": "normed", "n_layers": 4, "width": 32, "dims": ["layer", "sample", "hidden"]}]
    monkeypatch.setenv("ACTSTORE_TOKEN", "tok-a-at-least-16-chars")
    assert main(["query", "--address", server.address, "runs"]) == 0
    line = next(text for text in capsys.readouterr().out.splitlines() if text.startswith("tok/0shot"))
    assert f"capture: {run.n_samples} token rows, sites resid_post, mlp_out, act (64 wide), float32" in line
