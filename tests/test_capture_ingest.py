"""``actstore ingest`` of a text dataset at any sites and positions: what is stored equals a direct forward with
hooks on the same modules, bit for bit, read back through the store and through plain xarray; bad requests
are refused in one line with nothing written; a killed capture in a bucket resumes to the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM, AutoTokenizer

from actstore import testing
from actstore.cli import main
from actstore.client import Client
from actstore.server.process import ServerProcess
from actstore.store import Store
from actstore.testing import make_questions, write_jsonl

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "normed")
PATTERN = "model.layers.*.mlp.act_fn"
PATTERN_NAME = "act=" + PATTERN


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    rows = [
        {"text": r["question"], "topic": r["topic"], "n": i % 3, "note": "x"}
        for i, r in enumerate(make_questions(2)[:9])
    ]
    return write_jsonl(tmp_path_factory.mktemp("texts") / "texts.jsonl", rows)


def capture_args(store, model, data, *extra: str) -> list[str]:
    return testing.ingest_args(store, model, data, "--text-column", "text", "--label-columns", "topic,n", *extra)


class Direct:
    """The tiny model run by hand, one text at a time, with plain torch hooks on the named modules."""

    def __init__(self, folder: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def forward(self, text: str) -> tuple[list[int], dict[str, np.ndarray]]:
        """Token ids and, per site, (layer, token, width) float32."""
        blocks = self.model.model.layers
        modules = {
            "resid_post": list(blocks),
            "attn_out": [b.self_attn for b in blocks],
            "mlp_out": [b.mlp for b in blocks],
            "normed": [b.input_layernorm for b in blocks],
            "act": [b.mlp.act_fn for b in blocks],
        }
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in [*modules, "resid_pre"]}
        hooks = []
        for name, mods in modules.items():
            for m in mods:
                hooks.append(
                    m.register_forward_hook(
                        lambda _m, _i, out, name=name: seen[name].append(out[0] if isinstance(out, tuple) else out)
                    )
                )
        for b in blocks:
            hooks.append(
                b.register_forward_pre_hook(
                    lambda _m, args, kwargs: seen["resid_pre"].append(args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True,
                )
            )
        ids = self.tokenizer(text)["input_ids"]
        try:
            with torch.inference_mode():
                self.model(torch.tensor([ids]), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return ids, {name: torch.stack([t[0] for t in ts]).float().numpy() for name, ts in seen.items()}


def expected(direct: Direct, texts: list[str], positions: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per site (layer, row, width) and the rows' sample, position and token id, for texts in storage order."""
    states: dict[str, list[np.ndarray]] = {}
    coords: dict[str, list[int]] = {"sample": [], "position": [], "token_id": []}
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    for i in order:
        ids, sites = direct.forward(texts[i])
        n = len(ids)
        if positions == "all":
            at = list(range(n))
        elif positions == "last":
            at = [n - 1]
        elif positions == "mean":
            at = None
        else:
            at = sorted({int(p) % n for p in positions.split(",")})  # in the text's order, each once
        for name, values in sites.items():
            picked = _mean(values) if at is None else values[:, at]
            states.setdefault(name, []).append(picked)
        coords["sample"] += [i] * (1 if at is None else len(at))
        coords["position"] += [-1] if at is None else at
        coords["token_id"] += [-1] if at is None else [ids[p] for p in at]
    return {k: np.concatenate(v, axis=1) for k, v in states.items()}, {k: np.array(v) for k, v in coords.items()}


def _mean(values: np.ndarray) -> np.ndarray:
    """The float32 mean over a text's tokens as torch takes it, (layer, 1, width)."""
    return np.stack([torch.from_numpy(layer).mean(0).numpy() for layer in values])[:, None]


@pytest.mark.parametrize("positions", ["all", "last", "mean", "0,-1,2"])
def test_every_site_and_positions_mode_equals_a_direct_forward_bit_for_bit(positions, tiny_model, texts_file, tmp_path):
    store = tmp_path / "store"
    sites = ",".join([*SITES, PATTERN_NAME])
    args = capture_args(store, tiny_model, texts_file, "--sites", sites, "--positions", positions, "--batch-size", "1")
    assert main(args) == 0

    rows = [json.loads(line) for line in texts_file.read_text().splitlines()]
    want, coords = expected(Direct(tiny_model), [r["text"] for r in rows], positions)
    run = Store(store).run("tiny-llama", "0shot")
    ds = xr.open_zarr(store / "tiny-llama" / "0shot")  # plain xarray: no actstore import needed
    row_dim = "token" if positions in ("all", "0,-1,2") else "sample"
    assert run.row_dim == row_dim and set(run.sites) == {*SITES, "act"}
    for name in [*SITES, "act"]:
        n_layers = want[name].shape[0]
        stored = run.read_states(list(range(n_layers)), site=name)
        assert stored.dtype == np.float32
        np.testing.assert_array_equal(stored, want[name])
        assert ds[name].dims[:2] == ("layer", row_dim)
        np.testing.assert_array_equal(ds[name].values, want[name])
    assert ds["mlp_out"].dims[2] == "hidden" and ds["act"].dims[2] == "act.hidden"  # a width of its own
    for name, values in coords.items():
        np.testing.assert_array_equal(run.labels()[name], values)
        np.testing.assert_array_equal(ds[name].values, values)
    topics = {i: r["topic"] for i, r in enumerate(rows)}
    assert list(ds["topic"].values) == [topics[i] for i in coords["sample"]]
    assert ds["n"].dtype == np.int64 and list(ds["n"].values) == [i % 3 for i in coords["sample"]]
    assert run.n_texts == len(rows) and run.complete

    # the third way: through a real server, with the client and with `query get --out x.nc`
    with ServerProcess(store, tmp_path / "server.log") as server, Client(server.address) as client:
        for name in [*SITES, "act"]:
            served = client.hidden_states("tiny-llama", "0shot", site=name)
            assert served.dims[:2] == ("layer", row_dim) and served.name == name
            np.testing.assert_array_equal(served.values, want[name])
            np.testing.assert_array_equal(served["token_id"].values, coords["token_id"])
        out = tmp_path / "x.nc"
        assert (
            main(
                ["query", "--address", server.address, "get", "tiny-llama", "0shot", "--site", "act", "--out", str(out)]
            )
            == 0
        )
    with xr.open_dataset(out) as written:
        np.testing.assert_array_equal(written["act"].values, want["act"])
        np.testing.assert_array_equal(written["position"].values, coords["position"])


def test_positions_all_selects_by_sample_position_and_token(tiny_model, texts_file, tmp_path, capsys):
    """The token axis carries, for every token, its sample, position and token id: a reader selects by any."""
    store = tmp_path / "store"
    assert main(capture_args(store, tiny_model, texts_file, "--positions", "all", "--top-logits", "3")) == 0
    capsys.readouterr()
    assert main(["ls", "--store", str(store)]) == 0
    listed = capsys.readouterr().out.splitlines()[1].split()
    assert listed[0] == "tiny-llama/0shot" and listed[2] == "9" and int(listed[3]) > 9  # texts, tokens
    assert listed[-2] == "resid_post;"
    ds = xr.open_zarr(store / "tiny-llama" / "0shot")
    assert ds["resid_post"].dims == ("layer", "token", "hidden")
    one = ds.isel(token=ds["sample"].values == 4)
    assert list(one["position"].values) == list(range(one.sizes["token"]))  # a text's tokens are contiguous
    assert ds["top_ids"].dims == ("token", "top") and ds["top_ids"].shape[1] == 3
    checked = xr.open_dataset(store, engine="actstore", group="tiny-llama/0shot", chunks={})  # actstore's reader
    assert checked["resid_post"].dims == ("layer", "token", "hidden")
    np.testing.assert_array_equal(checked["resid_post"].isel(layer=1).values, ds["resid_post"].isel(layer=1).values)
    np.testing.assert_array_equal(checked["token_id"].values, ds["token_id"].values)
    text = json.loads(texts_file.read_text().splitlines()[4])["text"]
    assert list(one["token_id"].values.astype(int)) == Direct(tiny_model).tokenizer(text)["input_ids"]


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_store_dtype_rounds_as_asked_and_is_recorded(store_dtype, tiny_model, texts_file, tmp_path):
    exact, rounded = tmp_path / "exact", tmp_path / "rounded"
    assert main(capture_args(exact, tiny_model, texts_file, "--positions", "all")) == 0
    assert main(capture_args(rounded, tiny_model, texts_file, "--positions", "all", "--store-dtype", store_dtype)) == 0
    a, b = Store(exact).run("tiny-llama", "0shot"), Store(rounded).run("tiny-llama", "0shot")
    assert a.attrs["recipe"]["store_dtype"] == "float32" and b.attrs["recipe"]["store_dtype"] == store_dtype
    full, small = a.read_states([0, 1, 2]), b.read_states([0, 1, 2])
    torch_dtype = getattr(torch, store_dtype)
    want = torch.from_numpy(full).to(torch_dtype).float().numpy()
    np.testing.assert_array_equal(small.astype(np.float32), want)
    assert small.dtype == (np.float16 if store_dtype == "float16" else np.float32)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--text-column", "body"], "body"),
        (["--template", "{text} {missing}"], "missing"),
        (["--text-column", "text", "--label-columns", "nope"], "nope"),
        (["--text-column", "text", "--sites", "model.layers.*.mlp.down_prj"], "down_proj"),
        (["--text-column", "text", "--positions", "0,400"], "400"),
        (["--text-column", "text", "--sites", "resid_post,norm=model.norm"], "different numbers of layers"),
        (["--text-column", "text", "--sites", "resid_post,resid_post"], "resid_post"),
        (["--text-column", "text", "--positions", "middle"], "middle"),
        (["--text-column", "text", "--methods", "1shot"], "1shot"),
    ],
)
def test_bad_capture_requests_are_one_line_each_and_write_nothing(
    extra, words, tiny_model, texts_file, tmp_path, capsys
):
    store = tmp_path / "store"
    assert main(testing.ingest_args(store, tiny_model, texts_file, *extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar, where one loads
    assert err.startswith("actstore: error:") and words in err
    assert not store.exists()


def test_an_empty_dataset_is_refused(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(testing.ingest_args(tmp_path / "store", tiny_model, empty, "--text-column", "text")) == 1
    assert "no rows" in capsys.readouterr().err


def test_dry_run_estimates_bytes_within_2x_of_what_is_written(tiny_model, texts_file, tmp_path, capsys):
    store = tmp_path / "store"
    args = capture_args(store, tiny_model, texts_file, "--positions", "all", "--sites", "resid_post,mlp_out")
    assert main([*args, "--dry-run"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    estimated_mb = float(line[-1].removesuffix("MB"))
    assert not store.exists()
    assert main(args) == 0
    written = Store(store).run("tiny-llama", "0shot").size_bytes() / 1e6
    assert written / 2 <= estimated_mb <= written * 2, (estimated_mb, written)


def test_a_resumed_capture_appends_only_the_missing_texts(tiny_model, texts_file, tmp_path):
    store = tmp_path / "store"
    assert main(capture_args(store, tiny_model, texts_file, "--positions", "all", "--limit", "4")) == 0
    assert main(capture_args(store, tiny_model, texts_file, "--positions", "all")) == 0
    clean = tmp_path / "clean"
    assert main(capture_args(clean, tiny_model, texts_file, "--positions", "all")) == 0
    a, b = Store(store).run("tiny-llama", "0shot"), Store(clean).run("tiny-llama", "0shot")
    assert a.n_texts == b.n_texts == 9
    assert sorted(a.committed_samples()) == sorted(b.committed_samples())


def test_a_capture_larger_than_its_disks_free_space_is_refused_before_anything_is_written(
    tiny_model, texts_file, tmp_path, capsys
):
    sites = ("--positions", "all", "--sites", ",".join(SITES))
    assert main([*capture_args(tmp_path / "unused", tiny_model, texts_file, *sites), "--dry-run"]) == 0
    estimated = float(capsys.readouterr().out.strip().splitlines()[-1].split()[-1].removesuffix("MB")) * 1e6
    mount = tmp_path / "small-disk"
    mount.mkdir()
    kib = max(4, int(estimated / 4) // 4096 * 4)  # a quarter of the estimate, in pages (tmpfs size=0: no limit)
    prefix = testing.small_disk(mount, f"{kib}k")
    if prefix is None:
        pytest.skip("no small filesystem: neither a user+mount namespace (unshare) nor root to mount a tmpfs")
    refused, forced = testing.refused_then_forced(
        prefix, mount, capture_args(mount / "store", tiny_model, texts_file, *sites)
    )
    last = refused["err"].strip().splitlines()[-1]
    assert refused["rc"] == 1 and "Traceback" not in refused["err"], refused["err"][-2000:]
    assert last.startswith("actstore: error: tiny-llama/0shot's capture would write about") and "B free" in last
    assert "--limit" in last and "--no-space-check" in last
    assert refused["files"] == []  # refused before the store was made
    forced_last = forced["err"].strip().splitlines()[-1]
    assert forced["rc"] == 1 and "No space left" in forced_last, forced["err"][-2000:]  # the check was the refusal


LEASE_SECONDS = 2.0  # the killed capture's writer lease, short so that the test need not wait a minute


def _rows_committed(url: str) -> int:
    try:
        return Store(url).run("tiny-llama", "0shot").n_samples
    except Exception:  # noqa: BLE001 - not there yet
        return 0


def test_kill_during_a_capture_into_a_bucket_then_rerun_equals_uninterrupted(tiny_model, tmp_path, bucket):
    rows = [
        {"text": r["question"] + " " + r["answer_a"], "topic": r["topic"]} for s in range(3) for r in make_questions(s)
    ]
    data = write_jsonl(tmp_path / "many.jsonl", rows)
    url = f"{bucket}/store"
    extra = ["--text-column", "text", "--label-columns", "topic", "--positions", "all"]
    extra += ["--sites", "resid_post,mlp_out", "--batch-size", "4"]
    env = {**os.environ, "ACTSTORE_LEASE_SECONDS": str(LEASE_SECONDS)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "actstore",
            *testing.ingest_args(url, tiny_model, data, *extra, "--commit-seconds", "0"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while _rows_committed(url) < 200 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the capture ended before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    died = time.monotonic()
    killed = Store(url).run("tiny-llama", "0shot")
    assert 0 < killed.n_texts < len(rows) and not killed.complete

    time.sleep(max(0.0, died + LEASE_SECONDS + 3.5 - time.monotonic()))  # the dead writer's lease expires
    # each run in a fresh process, as the killed one: the test process's torch may run other thread counts
    # (set by earlier tests), and another count sums in another order: equal values, not equal bits
    resume = [sys.executable, "-m", "actstore", *testing.ingest_args(url, tiny_model, data, *extra)]
    assert subprocess.run(resume, env=env, capture_output=True).returncode == 0
    clean = tmp_path / "clean"
    uninterrupted = [sys.executable, "-m", "actstore", *testing.ingest_args(clean, tiny_model, data, *extra)]
    assert subprocess.run(uninterrupted, env=env, capture_output=True).returncode == 0  # in a folder
    resumed, reference = Store(url).run("tiny-llama", "0shot"), Store(clean).run("tiny-llama", "0shot")
    assert resumed.complete and resumed.n_samples == reference.n_samples > killed.n_samples
    for site in ("resid_post", "mlp_out"):
        np.testing.assert_array_equal(
            resumed.read_states([0, 1, 2], site=site), reference.read_states([0, 1, 2], site=site)
        )
    for name, values in reference.labels().items():
        np.testing.assert_array_equal(resumed.labels()[name], values)


def test_label_types_come_from_the_whole_column_not_the_first_batch(tiny_model, tmp_path):
    """The shortest text (stored first) holds a whole number in a float column: still stored as float."""
    rows = [{"text": "a b", "score": 1}, *({"text": f"text number {i} " * 3, "score": i + 0.5} for i in range(5))]
    data = write_jsonl(tmp_path / "scores.jsonl", rows)
    extra = ["--text-column", "text", "--label-columns", "score", "--batch-size", "1"]
    assert main(testing.ingest_args(tmp_path / "store", tiny_model, data, *extra)) == 0
    run = Store(tmp_path / "store").run("tiny-llama", "0shot")
    scores = dict(zip(run.labels()["sample"].tolist(), run.labels()["score"].tolist()))
    assert run.labels()["score"].dtype == np.float64 and scores == {i: r["score"] for i, r in enumerate(rows)}


def test_capture_options_alone_make_a_capture_of_the_study_questions(tiny_model, questions_file, tmp_path):
    """--positions (or --store-dtype, --top-logits, --max-tokens) without --sites captures the default site,
    rather than being ignored by the study's ingest."""
    store = tmp_path / "store"
    assert main(testing.ingest_args(store, tiny_model, questions_file, "--limit", "6", "--positions", "all")) == 0
    run = Store(store).run("tiny-llama", "0shot")
    assert run.row_dim == "token" and list(run.sites) == ["resid_post"] and run.n_texts == 6


def test_the_study_questions_are_captured_at_any_site_under_every_method(tiny_model, questions_file, tmp_path):
    """Without --text-column the study's prompts (shots included) are the texts; `normed` at the last token
    is the study's site, so its layers equal the question run's, bit for bit."""
    capture, study = tmp_path / "capture", tmp_path / "study"
    common = ["--methods", "0shot,1shot", "--limit", "12", "--batch-size", "1"]
    args = [*common, "--sites", "normed,mlp_out", "--positions", "last"]
    assert main(testing.ingest_args(capture, tiny_model, questions_file, *args)) == 0
    assert main(testing.ingest_args(study, tiny_model, questions_file, *common)) == 0
    for method in ("0shot", "1shot"):
        captured, reference = Store(capture).run("tiny-llama", method), Store(study).run("tiny-llama", method)
        assert captured.row_dim == "sample" and set(captured.labels()) >= {"subject", "answer"}
        np.testing.assert_array_equal(captured.labels()["sample"], reference.labels()["sample"])
        np.testing.assert_array_equal(captured.labels()["subject"], reference.labels()["subject"])
        np.testing.assert_array_equal(captured.read_states([0, 1, 2], site="normed"), reference.read_states([0, 1, 2]))
        assert captured.attrs["recipe"]["k"] == int(method[0])
        # the answer letters' logits at the last token: the model's answer, as the study's run reads it
        np.testing.assert_array_equal(captured.labels()["prediction"], reference.labels()["prediction"])
        np.testing.assert_array_equal(captured.labels()["correct"], reference.labels()["correct"])
        ds = xr.open_zarr(capture / "tiny-llama" / method)
        assert ds["letter_logits"].dims == ("sample", "letter") and ds["letter_logits"].shape == (12, 4)
        letters = np.array(list("ABCD"))[ds["letter_logits"].values.argmax(axis=1)]
        assert list(letters) == list(ds["prediction"].values)
