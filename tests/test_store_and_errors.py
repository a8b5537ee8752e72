"""The store opens with plain Zarr and xarray; bad input fails clearly and leaves the store intact."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from actstore.cli import main
from actstore.store import InvalidName, Store, safe_name, validate_name
from actstore.testing import make_questions, synthetic_labels, write_jsonl


def snapshot(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def filled(ingest_cli):
    assert ingest_cli("--methods", "0shot,1shot", "--per-subject", "4") == 0
    return ingest_cli


def test_plain_zarr_and_xarray_open_the_store(filled):
    ds = xr.open_zarr(filled.store, group="tiny-llama/0shot", consolidated=False)
    assert ds.hidden_states.dims == ("layer", "sample", "hidden")
    assert ds.hidden_states.shape == (4, 12, 32)
    for name in ("subject", "answer", "prediction", "correct"):
        assert ds[name].dims == ("sample",) and name in ds.coords
    assert list(ds.layer.values) == [0, 1, 2, 3]
    assert set(ds.subject.values) == {"anatomy", "astronomy", "college_biology"}
    group = zarr.open_group(filled.store, mode="r")["tiny-llama/0shot"]
    assert group["hidden_states"].metadata.dimension_names == ("layer", "sample", "hidden")
    np.testing.assert_array_equal(group["hidden_states"][2], ds.hidden_states[2].values)
    assert not np.isnan(ds.hidden_states.values).any()
    attrs = zarr.open_group(filled.store, mode="r")["tiny-llama/1shot"].attrs.asdict()
    assert {"recipe", "prompt", "progress"} <= set(attrs["json_attributes"].split())  # JSON text: netCDF-safe
    recipe = json.loads(attrs["recipe"])
    assert recipe["k"] == 1 and recipe["dataset"]["sha256"]
    assert len(json.loads(attrs["prompt"])["shot_ids"]["anatomy"]) == 1
    assert 0 <= attrs["accuracy"] <= 1


def test_plain_xarray_opens_the_tree_of_runs_a_cache_entry_and_exports_a_run_to_netcdf(filled, tmp_path):
    from actstore.analysis.layers import Mask, neighbour_graph

    run = Store(filled.store).run("tiny-llama", "0shot")
    graph = neighbour_graph(run, 2, Mask(per_subject=None), maxk=3)  # written under derived/ by the analysis
    tree = xr.open_datatree(filled.store, engine="zarr", consolidated=False)
    assert set(tree["tiny-llama/0shot"].children) == set()  # a finished run's tree: its arrays, not its caches
    assert "hidden_states" in tree["tiny-llama/0shot"].data_vars
    (key,) = [p.name for p in (Path(filled.store) / "tiny-llama/0shot/derived/neighbours").iterdir() if p.is_dir()]
    entry = xr.open_zarr(filled.store, group=f"tiny-llama/0shot/derived/neighbours/{key}", consolidated=False)
    np.testing.assert_array_equal(entry["indices"].values, graph["indices"])
    assert entry.attrs["per_subject"] == "null"  # None, as JSON text

    ds = xr.open_zarr(filled.store, group="tiny-llama/0shot", consolidated=False)
    ds.to_netcdf(tmp_path / "run.nc")
    back = xr.open_dataset(tmp_path / "run.nc")
    np.testing.assert_array_equal(back.hidden_states.values, ds.hidden_states.values)
    assert json.loads(back.attrs["recipe"]) == run.attrs["recipe"]
    assert run.n_samples == 12 and run.complete and run.access["visibility"] == "public"  # actstore reads on


@pytest.mark.parametrize("bad", ["..", "a/b", "../x", "", ".hidden", "x" * 200, "a..b"])
def test_names_that_could_escape_the_root_are_refused(bad):
    with pytest.raises(InvalidName):
        validate_name(bad)


def test_safe_name_keeps_hub_ids_readable():
    assert safe_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB--SmolLM2-135M"
    assert safe_name("../../etc") == "etc"


def test_cli_refuses_an_escaping_name(ingest_cli, tmp_path, capsys):
    assert ingest_cli("--name", "../escaped", "--limit", "2") == 1
    assert "invalid model name" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists()


def _csv_folder(root, dev_rows):
    (root / "test").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "test" / "anatomy_test.csv").write_text("What is a bone?,a,b,c,d,B\nWhat is skin?,a,b,c,d,A\n")
    (root / "dev" / "anatomy_dev.csv").write_text("".join(f"Dev {i}?,a,b,c,d,C\n" for i in range(dev_rows)))
    return root


BAD_INPUTS = {
    "missing model": (["--model", "/nonexistent/model"], "model not found"),
    "bad json": (["--dataset", "{bad_json}"], "not valid JSON"),
    "bad answer": (["--dataset", "{bad_answer}"], "answer must be one of A-D"),
    "three choices": (["--dataset", "{three_choices}"], "exactly 4 text choices"),
    "empty dataset": (["--dataset", "{empty}"], "no questions"),
    "unknown subject": (["--subjects", "anatomy,alchemy"], "unknown subject(s) alchemy"),
    "k over pool": (["--dataset", "{csv}", "--methods", "3shot"], "needs 3 shots"),
    "k over 5": (["--methods", "6shot"], "exceeds the shot pool"),
    "unwritable store": (["--store", "{file}/store"], "cannot write the store"),
    "other recipe": (["--methods", "0shot", "--per-subject", "4", "--site", "residual"], "different recipe"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_one_line_error_and_the_store_is_intact(filled, tmp_path, capsys, case):
    good = make_questions()
    files = {
        "bad_json": tmp_path / "bad.jsonl",
        "bad_answer": write_jsonl(tmp_path / "answer.jsonl", good[:3] + [{**good[3], "correct_answer": "E"}]),
        "three_choices": write_jsonl(tmp_path / "three.jsonl", [{k: v for k, v in good[0].items() if k != "answer_d"}]),
        "empty": tmp_path / "empty.jsonl",
        "csv": _csv_folder(tmp_path / "mmlu_csv", dev_rows=2),
        "file": tmp_path / "a_file",
    }
    files["bad_json"].write_text(json.dumps(good[0]) + "\n{not json\n")
    files["empty"].write_text("\n")
    files["file"].write_text("")
    args, message = BAD_INPUTS[case]
    before = snapshot(filled.store)
    capsys.readouterr()
    assert filled(*[a.format(**files) for a in args]) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last_line and last_line.startswith("actstore: error:")
    assert snapshot(filled.store) == before


def test_rerun_does_nothing_and_raising_per_subject_appends(filled, capsys):
    before = snapshot(filled.store)
    capsys.readouterr()
    assert filled("--methods", "0shot,1shot", "--per-subject", "4") == 0
    assert capsys.readouterr().out.count("up to date") == 2
    assert snapshot(filled.store) == before

    old = Store(filled.store).run("tiny-llama", "0shot")
    old_states, old_ids = old.hidden_states[:], old.labels()["sample"]
    assert filled("--methods", "0shot", "--per-subject", "6") == 0
    new = Store(filled.store).run("tiny-llama", "0shot")
    assert new.n_samples == 18 and new.complete
    np.testing.assert_array_equal(new.hidden_states[:, :12], old_states)
    np.testing.assert_array_equal(new.labels()["sample"][:12], old_ids)
    assert len(set(new.labels()["sample"].tolist())) == 18
    assert [h["added"] for h in new.attrs["history"]] == [12, 6]


def test_overwrite_replaces_a_run_of_another_recipe(filled):
    assert filled("--methods", "0shot", "--per-subject", "2", "--site", "residual", "--overwrite") == 0
    run = Store(filled.store).run("tiny-llama", "0shot")
    assert run.attrs["recipe"]["site"] == "residual" and run.n_samples == 6


def test_ls_lists_runs(filled, capsys):
    capsys.readouterr()
    assert main(["ls", "--store", str(filled.store)]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama/0shot" in out and "tiny-llama/1shot" in out and "complete" in out


def test_dry_run_writes_nothing(ingest_cli, capsys):
    assert ingest_cli("--methods", "0shot,2shot", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "tiny-llama/0shot" in out and "tiny-llama/2shot" in out
    assert not ingest_cli.store.exists()


def test_csv_folder_takes_shots_from_dev(tiny_model, tmp_path):
    data = _csv_folder(tmp_path / "mmlu_csv", dev_rows=5)
    store = tmp_path / "s"
    assert (
        main(
            [
                "ingest",
                "--store",
                str(store),
                "--model",
                str(tiny_model),
                "--dataset",
                str(data),
                "--methods",
                "2shot",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    run = Store(store).run("tiny-llama", "2shot")
    assert run.n_samples == 2  # no test question held out when a dev split exists
    assert run.attrs["recipe"]["shot_source"].startswith("dev split")


@pytest.mark.parametrize("parallel", [False, True])
def test_fast_reader_equals_zarr_for_layers_ranges_and_single_samples(ingest_cli, tmp_path, monkeypatch, parallel):
    from actstore.store import reader

    monkeypatch.setattr(reader, "_PARALLEL_BYTES", 0 if parallel else 1 << 40)
    rows = [r for seed in range(3) for r in make_questions(seed)]
    data = write_jsonl(tmp_path / "more.jsonl", rows)
    assert ingest_cli("--dataset", str(data), "--methods", "0shot") == 0
    run = Store(ingest_cli.store).run("tiny-llama", "0shot")
    full = run.hidden_states[:]
    n = run.n_samples
    assert run.reader.direct and n > run.hidden_states.shards[1] * 3  # spans several shards
    np.testing.assert_array_equal(run.read_states([0, 1, 2, 3]), full)
    for start, stop in [(0, 1), (n - 1, n), (5, 70), (32, 64), (3, 3), (30, 34)]:
        np.testing.assert_array_equal(run.read_states([2, 0], start, stop), full[[2, 0], start:stop])
    with pytest.raises(IndexError):
        run.read_states([4])
    with pytest.raises(IndexError):
        run.read_states([0], 0, n + 1)


def test_listing_needs_no_torch(filled):
    import subprocess
    import sys

    code = (
        "import sys; from actstore.cli import main; code = main(['ls', '--store', sys.argv[1]]); "
        "assert 'torch' not in sys.modules and 'dask' not in sys.modules; sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(filled.store)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "tiny-llama/0shot" in done.stdout


def test_readers_see_only_whole_committed_samples_while_a_writer_commits(tmp_path):
    import threading

    store = Store(tmp_path / "store")
    hidden, batch, batches = 32, 5, 60

    def batch_of(start):
        ids = np.arange(start, start + batch)
        states = (ids[None, :, None] * 10 + np.arange(3)[:, None, None] + np.zeros(hidden)).astype(np.float32)
        return states, synthetic_labels(start, batch)

    writer = store.writer("m", "0shot", recipe={"r": 1}, attrs={}, n_layers=3, hidden=hidden, commit_seconds=0)
    writer.add(*batch_of(0))

    def write():
        for b in range(1, batches):
            writer.add(*batch_of(b * batch))
        writer.close()

    thread = threading.Thread(target=write)
    thread.start()
    reads = 0
    while thread.is_alive() or reads == 0:
        run = Store(store.url).run("m", "0shot")
        n = run.n_samples
        got = run.read_states([0, 2], 0, n)
        ids = run.labels()["sample"]
        assert n % batch == 0 and len(ids) == n
        np.testing.assert_array_equal(got[:, :, 0], ids[None, :] * 10 + np.array([[0], [2]]))
        reads += 1
    thread.join()
    assert Store(store.url).run("m", "0shot").n_samples == batch * batches and reads > 1


def _save_derived_at_once(store_root, barrier, index: int, failures) -> None:
    barrier.wait()
    try:
        Store(store_root).run("tiny-llama", "0shot").save_derived(
            "density", f"key{index}", {"x": np.arange(3.0)}, {"i": index}
        )
    except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
        failures.put(f"{type(exc).__name__}: {exc}")


def test_concurrent_processes_create_the_first_derived_entries_of_a_run(ingest_cli, tmp_path):
    """Dask workers analysing layers of a fresh run write its first derived entries at the same moment."""
    import multiprocessing
    import shutil

    assert ingest_cli("--methods", "0shot") == 0
    run_path = ingest_cli.store / "tiny-llama" / "0shot"
    context = multiprocessing.get_context("fork")
    failures = context.Queue()
    for _ in range(10):
        shutil.rmtree(run_path / "derived", ignore_errors=True)
        barrier = context.Barrier(6)
        workers = [
            context.Process(target=_save_derived_at_once, args=(ingest_cli.store, barrier, i, failures))
            for i in range(6)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert not failures.qsize(), failures.get()
        run = Store(ingest_cli.store).run("tiny-llama", "0shot")
        assert all(run.load_derived("density", f"key{i}")[1]["i"] == i for i in range(6))


def test_listing_runs_while_runs_are_created_never_fails(tmp_path):
    """Creating a run writes its group, then clears and writes it again: a reader between the two must
    see "not a run yet", never an error (ls and the server list runs while ingests start)."""
    import threading

    store = Store(tmp_path / "store")
    store.ensure_writable()
    errors: list[BaseException] = []
    done = threading.Event()

    def list_runs() -> None:
        while not done.is_set():
            try:
                store.runs()
                store.has_run("m", "0shot")
            except BaseException as exc:  # noqa: BLE001 - any error is the failure under test
                errors.append(exc)
                return

    reader = threading.Thread(target=list_runs)
    reader.start()
    try:
        for i in range(40):
            with store.writer("m", "0shot", recipe={"i": i}, attrs={}, n_layers=1, hidden=4, overwrite=True):
                pass
    finally:
        done.set()
        reader.join()
    assert errors == []
