"""``actstore export`` and ``actstore import``: a question run and capture runs (token rows with labels, top
logits and answer-letter logits over two sites of two widths; float16 text rows) exported to Parquet, a
``datasets`` folder and netCDF read back by each format's own library equal to the store's reads bit for bit,
the recipe along; a SAELens activation cache imported and read back equal; export then import gives the run
again; an interrupted import resumes; bad input is refused in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import xarray as xr

from actstore.cli import main
from actstore.exchange import cache_import as import_module
from actstore.exchange import selection as selection_module
from actstore.store import Store
from actstore.store.capture import CaptureLayout
from actstore.testing import write_synthetic_capture, write_synthetic_run

MODEL = "synth"
TOKENS, TEXTS, QUESTIONS = "tokens", "texts-f16", "0shot"
HOOK = "blocks.6.hook_resid_post"


def _write_tokens(store: Store) -> None:
    """Token rows of 14 texts (3 to 9 tokens) over two sites, 16 and 24 wide, with float64, bool and str labels,
    the 2 largest logits and the logits of two answer letters, in three commits."""
    capture = CaptureLayout(
        rows="token",
        n_layers=3,
        hidden=16,
        sites={"resid_post": 16, "wide": 24},
        labels={"score": "float64", "flag": "bool", "tag": "str"},
        top_k=2,
        letters=("A", "B"),
    )
    lengths = np.random.default_rng(1).integers(3, 10, size=14)
    provenance = {"created": "now", "access": {"visibility": "public"}}
    write_synthetic_capture(store, MODEL, TOKENS, capture, lengths, seed=2, provenance=provenance)


def _write_texts(store: Store) -> None:
    """One float16 row per text (a text's mean), 10 texts, an int64 label."""
    rng = np.random.default_rng(2)
    capture = CaptureLayout(
        rows="sample", n_layers=2, hidden=8, sites={"mlp_out": 8}, store_dtype="float16", labels={"n": "int64"}
    )
    with store.begin_run(MODEL, TEXTS, recipe={"positions": "mean", "synthetic": 3}) as writer:
        writer.start(provenance={"created": "now"}, capture=capture, planned=10)
        writer.add(
            {"mlp_out": rng.standard_normal((2, 10, 8)).astype(np.float16)},
            {
                "sample": np.arange(10) * 3,
                "position": np.full(10, -1),
                "token_id": np.full(10, -1),
                "n": np.arange(10) % 4,
            },
        )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exchange") / "store"
    with Store(root).writing() as store:
        _write_tokens(store)
        _write_texts(store)
        write_synthetic_run(store, MODEL, QUESTIONS, n_layers=3, n_samples=40, hidden=12, batch=15)
    return root


def _export(store: Path, method: str, fmt: str, out: Path, *extra: str) -> int:
    return main(
        [
            "export",
            "--store",
            str(store),
            "--model",
            MODEL,
            "--method",
            method,
            "--format",
            fmt,
            "--out",
            str(out),
            *extra,
        ]
    )


def _expected(store: Path, method: str, site: str | None, layers: list[int] | None = None, rows=None):
    """(states (layer, row, width), coordinates by name, recipe) as the store reads them."""
    run = Store(store).run(MODEL, method)
    site = site or run.default_site
    layers = list(range(run.states(site).shape[0])) if layers is None else layers
    rows = np.arange(run.n_samples) if rows is None else rows
    states = run.read_states(layers, site=site)[:, rows]
    coords = {name: values[rows] for name, values in run.labels().items()}
    if run.capture is not None and run.capture.top_k:
        ds = run.to_xarray()
        coords.update({name: ds[name].values[rows] for name in ("top_ids", "top_logits", "letter_logits")})
    return states, coords, run.attrs["recipe"]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values of equal dtype, bit for bit (text compared as text)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "OUST" or b.dtype.kind in "OUST":
        return a.shape == b.shape and [str(v) for v in a.ravel()] == [str(v) for v in b.ravel()]
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


CASES = [(TOKENS, None), (TOKENS, "wide"), (TEXTS, None), (QUESTIONS, None)]


@pytest.mark.parametrize(("method", "site"), CASES)
def test_parquet_export_reads_back_equal_with_pyarrow_and_pandas(store, tmp_path, method, site):
    out = tmp_path / "run.parquet"
    assert _export(store, method, "parquet", out, *(["--site", site] if site else [])) == 0
    states, coords, recipe = _expected(store, method, site)
    table = pq.read_table(out)
    record = json.loads(table.schema.metadata[b"actstore"])
    assert record["recipe"] == recipe and record["attributes"]["recipe"] == recipe
    assert "shard_record" not in record["attributes"]
    site = record["site"]
    for i in range(states.shape[0]):
        column = table.column(f"{site}.{i}").combine_chunks()
        assert _same(column.flatten().to_numpy().reshape(len(column), -1), states[i])
    for name, values in coords.items():
        column = table.column(name).to_numpy(zero_copy_only=False)
        assert _same(np.stack(column) if values.ndim == 2 else column, values), name
    frame = pd.read_parquet(out, columns=["sample", f"{site}.1"])
    assert _same(frame["sample"].to_numpy(), coords["sample"])
    assert _same(np.stack(frame[f"{site}.1"].to_numpy()), states[1])


@pytest.mark.parametrize(("method", "site"), CASES)
def test_hf_datasets_export_reads_back_equal_with_load_from_disk(store, tmp_path, method, site):
    out = tmp_path / "run-dataset"
    assert _export(store, method, "hf-datasets", out, *(["--site", site] if site else [])) == 0
    states, coords, recipe = _expected(store, method, site)
    dataset = datasets.load_from_disk(str(out))
    record = json.loads(dataset.info.description)
    assert record["recipe"] == recipe and record["model"] == MODEL and record["method"] == method
    rows = dataset.with_format("numpy")[:]  # datasets' numpy format gives float32 (float16 widened, exactly)
    for i in range(states.shape[0]):
        assert _same(rows[f"{record['site']}.{i}"].astype(states.dtype), states[i])
    table = dataset.with_format("arrow")[:]  # as stored
    assert dataset.features[f"{record['site']}.0"].feature.dtype == str(states.dtype)
    for name, values in coords.items():
        column = table.column(name).to_numpy(zero_copy_only=False)
        assert _same(np.stack(column) if values.ndim == 2 else column, values), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-dataset"]  # no scratch left beside it


@pytest.mark.parametrize(("method", "site"), CASES)
def test_netcdf_export_reads_back_equal_with_xarray(store, tmp_path, method, site):
    out = tmp_path / "run.nc"
    assert _export(store, method, "netcdf", out, *(["--site", site] if site else [])) == 0
    states, coords, recipe = _expected(store, method, site)
    with xr.open_dataset(out) as ds:
        record = json.loads(ds.attrs["actstore"])
        name = "hidden_states" if method == QUESTIONS else record["site"]
        values = ds[name].values
        if method == TEXTS:  # NetCDF 3 has no float16: widened, exactly
            assert ds[name].attrs["stored_dtype"] == "float16" and values.dtype == np.float32
            values = values.astype(np.float16)
        assert _same(values, states)
        assert json.loads(ds.attrs["recipe"]) == recipe
        assert json.loads(ds.attrs["run_attributes"])["recipe"] == recipe
        assert ds.attrs["json_attributes"] == "actstore recipe run_attributes"
        for key, expected in coords.items():
            got = ds[key].values
            if expected.dtype == np.int64:  # NetCDF 3 has no int64: int32 where the values fit
                got = got.astype(np.int64)
            assert _same(got, expected), key


def test_export_of_some_layers_and_samples(store, tmp_path):
    run = Store(store).run(MODEL, TOKENS)
    ids = [int(run.labels()["sample"][-1]), int(run.labels()["sample"][0])]
    out = tmp_path / "some.parquet"
    assert _export(store, TOKENS, "parquet", out, "--layers", "0,2", "--samples", ",".join(map(str, ids))) == 0
    rows = np.flatnonzero(np.isin(run.labels()["sample"], ids))  # every row of each, in the run's order
    states, coords, _ = _expected(store, TOKENS, None, [0, 2], rows)
    table = pq.read_table(out)
    assert table.column_names[-2:] == ["resid_post.0", "resid_post.2"]
    assert _same(np.stack(table.column("resid_post.2").to_numpy(zero_copy_only=False)), states[1])
    assert _same(table.column("position").to_numpy(), coords["position"])
    record = json.loads(table.schema.metadata[b"actstore"])
    assert record["layers"] == [0, 2] and record["selection"] == {"samples": ids}
    out = tmp_path / "span.nc"
    assert _export(store, QUESTIONS, "netcdf", out, "--rows", "5:9", "--layers", "1:3") == 0
    states, coords, _ = _expected(store, QUESTIONS, None, [1, 2], np.arange(5, 9))
    with xr.open_dataset(out) as ds:
        assert _same(ds["hidden_states"].values, states) and ds["layer"].values.tolist() == [1, 2]
        assert _same(ds["sample"].values.astype(np.int64), coords["sample"])


def _saelens_cache(path: Path, n: int = 7, context: int = 5, width: int = 6, dtype="float32", token_ids=True):
    """A cache as SAELens' CacheActivationsRunner writes it; returns (activations, token ids)."""
    rng = np.random.default_rng(4)
    acts = rng.standard_normal((n, context, width)).astype(dtype)
    ids = rng.integers(0, 1000, size=(n, context)).astype(np.int32)
    features = {HOOK: datasets.Array2D(shape=(context, width), dtype=dtype)}
    columns = {HOOK: acts}
    if token_ids:
        features["token_ids"] = datasets.List(datasets.Value("int32"), length=context)
        columns["token_ids"] = ids
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(path))
    return acts, ids


def _import(store: Path, path: Path, method: str, *extra: str) -> int:
    return main(
        ["import", "--format", "hf-datasets", str(path), "--store", str(store), "--model", "sae", "--method", method]
        + list(extra)
    )


def test_a_saelens_cache_imports_as_token_rows(tmp_path):
    acts, ids = _saelens_cache(tmp_path / "cache")
    store = tmp_path / "store"
    assert _import(store, tmp_path / "cache", "resid6") == 0
    run = Store(store).run("sae", "resid6")
    assert run.row_dim == "token" and list(run.sites) == [HOOK] and run.complete and run.n_texts == 7
    assert _same(run.read_states([0], site=HOOK)[0], acts.reshape(-1, 6))
    labels = run.labels()
    assert _same(labels["sample"], np.repeat(np.arange(7), 5))
    assert _same(labels["position"], np.tile(np.arange(5), 7))
    assert _same(labels["token_id"], ids.reshape(-1).astype(np.int64))
    recipe = run.attrs["recipe"]
    assert recipe["imported"]["layer"] == 6 and recipe["imported"]["location"] == str((tmp_path / "cache").resolve())
    assert recipe["positions"] == "all"


def test_a_float16_cache_without_token_ids_and_a_named_site_and_layer(tmp_path):
    cache = tmp_path / "cache"
    acts, _ = _saelens_cache(cache, dtype="float16", token_ids=False)
    store = tmp_path / "store"
    assert _import(store, cache, "m", "--site", "resid_post", "--layer", "3") == 0
    run = Store(store).run("sae", "m")
    assert run.capture.store_dtype == "float16" and list(run.sites) == ["resid_post"]
    assert _same(run.read_states([0], site="resid_post")[0], acts.reshape(-1, 6))
    assert _same(run.labels()["token_id"], np.full(35, -1, dtype=np.int64))
    assert run.attrs["recipe"]["imported"]["layer"] == 3


def test_an_interrupted_import_resumes_to_the_whole_cache(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    acts, ids = _saelens_cache(cache, n=9)
    store = tmp_path / "store"
    monkeypatch.setattr(import_module, "BLOCK_BYTES", 2 * 5 * 6 * 4)  # two cache rows a block
    blocks = import_module._SAELensCache.blocks

    def interrupted(self, done):
        for i, block in enumerate(blocks(self, done)):
            if i == 2:
                raise KeyboardInterrupt
            yield block

    monkeypatch.setattr(import_module._SAELensCache, "blocks", interrupted)
    assert _import(store, cache, "m") == 130
    assert Store(store).run("sae", "m").n_texts == 4
    monkeypatch.setattr(import_module._SAELensCache, "blocks", blocks)
    capsys.readouterr()
    assert _import(store, cache, "m") == 0
    assert "+5 texts" in capsys.readouterr().out
    run = Store(store).run("sae", "m")
    assert run.complete and _same(run.read_states([0], site=HOOK)[0], acts.reshape(-1, 6))
    assert _same(run.labels()["token_id"], ids.reshape(-1).astype(np.int64))
    assert _import(store, cache, "m") == 0  # up to date
    assert "+0 texts" in capsys.readouterr().out


@pytest.mark.parametrize(("method", "site"), [(TOKENS, "wide"), (TEXTS, None), (QUESTIONS, None)])
def test_export_then_import_gives_the_run_again(store, tmp_path, monkeypatch, method, site):
    monkeypatch.setattr(selection_module, "BLOCK_BYTES", 3 * 24 * 4 * 7)  # blocks of 7 rows: texts cut across
    monkeypatch.setattr(import_module, "BLOCK_BYTES", 3 * 24 * 4 * 7)
    folder = tmp_path / "export"
    assert _export(store, method, "hf-datasets", folder, *(["--site", site] if site else [])) == 0
    target = tmp_path / "store"
    assert _import(target, folder, "back") == 0
    original, back = Store(store).run(MODEL, method), Store(target).run("sae", "back")
    site = site or original.default_site
    assert list(back.sites) == [site] and back.row_dim == original.row_dim and back.complete
    assert back.n_samples == original.n_samples and back.n_texts == original.n_texts
    assert _same(back.read_states([0, 1], site=site), original.read_states([0, 1], site=site))
    for name, values in original.labels().items():
        assert _same(back.labels()[name], values), name
    if method == TOKENS:
        a, b = original.to_xarray(), back.to_xarray()
        for name in ("top_ids", "top_logits", "letter_logits", "letter"):
            assert _same(b[name].values, a[name].values), name
        assert back.capture.width_dim(site) == "wide.hidden"
    recipe = back.attrs["recipe"]
    assert {k: v for k, v in recipe.items() if k != "imported"} == original.attrs["recipe"]
    assert recipe["imported"]["run"] == f"{MODEL}/{method}"
    assert back.access == original.access


def _one_line_error(capsys, *words: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("actstore: error:") and err.count("\n") == 1, err
    assert all(word in err for word in words), err


def test_bad_exports_are_refused_in_one_line_with_nothing_written(store, tmp_path, capsys):
    out = tmp_path / "x.parquet"
    assert _export(store, "nope", "parquet", out) == 1
    _one_line_error(capsys, "no run synth/nope")
    assert _export(store, TOKENS, "parquet", out, "--site", "nowhere") == 1
    _one_line_error(capsys, "no site 'nowhere'", "resid_post, wide")
    assert _export(store, TOKENS, "parquet", out, "--layers", "0,7") == 1
    _one_line_error(capsys, "layers [7]", "0..2")
    assert _export(store, TOKENS, "parquet", out, "--samples", "100000") == 1
    _one_line_error(capsys, "not in run")
    assert _export(store, TOKENS, "hf-datasets", tmp_path / "missing" / "x") == 1
    _one_line_error(capsys, "is not a folder")
    assert list(tmp_path.iterdir()) == []
    out.write_text("keep")
    assert _export(store, TOKENS, "parquet", out) == 1
    _one_line_error(capsys, "exists; pass --overwrite")
    assert out.read_text() == "keep"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    assert _export(store, TOKENS, "hf-datasets", folder, "--overwrite") == 1
    _one_line_error(capsys, "not a datasets folder")
    assert _export(store, TOKENS, "netcdf", folder, "--overwrite") == 1
    _one_line_error(capsys, "is a folder")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine", "notes.txt", "x.parquet"]


def test_overwrite_replaces_an_export_and_a_failed_export_leaves_what_was_there(store, tmp_path, monkeypatch):
    out = tmp_path / "run-dataset"
    assert _export(store, QUESTIONS, "hf-datasets", out) == 0
    assert _export(store, TEXTS, "hf-datasets", out, "--overwrite") == 0
    assert json.loads(datasets.load_from_disk(str(out)).info.description)["method"] == TEXTS
    monkeypatch.setattr(selection_module, "BLOCK_BYTES", 1)

    def failing(self, layers, positions, site=None):
        if positions[0] > 2:
            raise OSError("No space left on device")
        return original(self, layers, positions, site)

    original = selection_module.Run.read_rows
    monkeypatch.setattr(selection_module.Run, "read_rows", failing)
    with pytest.raises(OSError):
        main(
            ["export", "--store", str(store), "--model", MODEL, "--method", QUESTIONS, "--format", "hf-datasets"]
            + ["--out", str(out), "--overwrite"]
        )
    assert json.loads(datasets.load_from_disk(str(out)).info.description)["method"] == TEXTS
    with pytest.raises(OSError):
        _export(store, QUESTIONS, "parquet", tmp_path / "new.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-dataset"]


def test_bad_imports_are_refused_in_one_line_with_nothing_written(tmp_path, capsys):
    store = tmp_path / "store"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("no cache")
    assert _import(store, plain, "m") == 1
    _one_line_error(capsys, "is not an Arrow cache")
    assert _import(store, tmp_path / "absent", "m") == 1
    _one_line_error(capsys, "is not a folder")
    flat = tmp_path / "flat"
    datasets.Dataset.from_dict({"x": [1.0, 2.0], "text": ["a", "b"]}).save_to_disk(str(flat))
    capsys.readouterr()  # the progress of save_to_disk
    assert _import(store, flat, "m") == 1
    _one_line_error(capsys, "2-D columns: none", "--column")
    assert _import(store, flat, "m", "--column", "x") == 1
    _one_line_error(capsys, "column 'x'", "is not 2-D")
    cache = tmp_path / "cache"
    _saelens_cache(cache)
    capsys.readouterr()
    assert _import(store, cache, "m", "--column", "nope") == 1
    _one_line_error(capsys, "no column 'nope'")
    renamed = tmp_path / "renamed"
    acts = np.zeros((2, 3, 4), dtype=np.float32)
    features = datasets.Features({"acts": datasets.Array2D(shape=(3, 4), dtype="float32")})
    datasets.Dataset.from_dict({"acts": acts}, features=features).save_to_disk(str(renamed))
    capsys.readouterr()
    assert _import(store, renamed, "m") == 1
    _one_line_error(capsys, "--layer")
    assert _import(store, cache, "m", "--site", "bad/name") == 1
    _one_line_error(capsys, "invalid site or label name")
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]})}).save_to_disk(str(splits))
    capsys.readouterr()
    assert _import(store, splits, "m") == 1
    _one_line_error(capsys, "splits train", "splits/train")
    assert not store.exists()


def test_an_import_into_a_run_of_another_recipe_is_refused(store, tmp_path, capsys):
    cache = tmp_path / "cache"
    _saelens_cache(cache)
    capsys.readouterr()
    assert (
        main(
            ["import", "--format", "hf-datasets", str(cache), "--store", str(store), "--model", MODEL]
            + ["--method", QUESTIONS]
        )
        == 1
    )
    _one_line_error(capsys, "already exists with a different recipe")
    assert Store(store).run(MODEL, QUESTIONS).attrs["recipe"] == {"synthetic": 0}
