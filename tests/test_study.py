"""The main job end to end at a tiny size: ingest -> server -> client -> analyses -> figures and tables."""

import logging
import re

import numpy as np
import pandas as pd
import pytest

from actstore.cli import main
from actstore.store import Store
from actstore.testing import derived_files, make_questions, write_jsonl

ICL = ["0shot", "1shot", "2shot", "5shot"]
# the job's pool, widened to 8 training + 2 held-out questions from every subject (24 + 6) so that the 3
# subjects here make 1 epoch of 2 steps; its log-spaced checkpoints round to step 1, and every one is probed
FINETUNED = ["finetuned-step1", "finetuned"]
METHODS = ICL + FINETUNED
PAIRS = ["0shot vs 5shot", "0shot vs finetuned", "5shot vs finetuned"]


@pytest.fixture(scope="module", autouse=True)
def wider_pool():
    """Every job of this module with the wider pool (reruns must ask for the same adapter)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("actstore.study.job.JOB_TRAIN_POOL", 10)
        yield


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("study")
    data = write_jsonl(root / "q.jsonl", [r for seed in range(4) for r in make_questions(seed)])
    args = [
        "study",
        "--store",
        str(root / "store"),
        "--results",
        str(root / "results"),
        "--model",
        str(tiny_model),
        "--dataset",
        str(data),
        "--per-subject",
        "60",
        "--dask-workers",
        "2",
    ]
    assert main(args) == 0
    return root, args


def test_the_job_writes_figures_tables_and_summary(study):
    root, _ = study
    results = root / "results"
    layers = pd.read_csv(results / "layers.csv")
    assert sorted(layers.method.unique()) == sorted(METHODS) and sorted(layers.layer.unique()) == [1, 2, 3]
    assert (layers.error.isna()).all(), layers.error  # every layer analysed
    assert (layers.id > 0).all() and (layers.n_clusters >= 1).all() and np.isfinite(layers.id_2nn).all()
    for name in ("ari_subject", "ari_answer", "ari_prediction"):
        assert layers[name].between(-1, 1).all()
    for name in ("overlap_subject", "overlap_answer", "core_fraction"):
        assert layers[name].between(0, 1).all()
    comparison = pd.read_csv(results / "comparison.csv")
    assert comparison.pair.unique().tolist() == PAIRS and len(comparison) == 3 * len(PAIRS)
    assert comparison.data_overlap.between(0, 1).all() and (comparison.n_common == 180).all()

    from matplotlib.image import imread

    for name in ("layers.png", "training.png"):
        figure = imread(results / name)
        assert figure.shape[0] > 600 and figure.shape[1] > 1000 and figure.std() > 0.05  # drawn, not blank

    summary = (results / "summary.md").read_text()
    store = Store(root / "store")
    for method in METHODS:
        run = store.run("tiny-llama", method)
        assert f"| {method} | 180 | {run.accuracy:.3f} |" in summary
    assert "## Transition layer" in summary and "layers.png" in summary
    tuned, base = store.run("tiny-llama", "finetuned"), store.run("tiny-llama", "0shot")
    assert f"| accuracy on the probed questions | {base.accuracy:.3f} | {tuned.accuracy:.3f} |" in summary
    record = tuned.attrs["finetune"]
    held = record["accuracy"]
    assert (
        f"| accuracy on 6 held-out questions (neither trained on nor probed) | {held['before']:.3f} | "
        f"{held['after']:.3f} |"
    ) in summary
    assert "Held-out accuracy at every checkpoint: step 0 " in summary and "without the subject header" in summary
    assert "Clipping: none" in summary and "checkpoints at steps 1, every one probed" in summary
    assert re.search(r"The fine-tuned model (reached|did not reach) 5shot accuracy on the probed questions", summary)
    assert "the model answers at chance" in summary  # the tiny random model: why no answer structure appears
    assert record["recipe"]["subjects"] == ["anatomy", "astronomy", "college_biology"]
    assert tuned.attrs["recipe"]["adapter"].startswith("unmerged")
    assert "Where finetuned and 5shot differ" in summary and "| ari_prediction |" in summary
    for ids in (record["training"]["ids"], record["training"]["held_out_ids"]):
        assert not set(ids) & set(base.labels()["sample"].tolist())
    log = (results / "server.log").read_text().splitlines()
    assert any(line.endswith(": stopped") for line in log)  # SIGTERM: graceful shutdown, Dask closed


def test_a_rerun_reuses_everything_and_plot_draws_the_same_from_the_store(study, caplog, tmp_path):
    root, args = study
    first = (root / "results" / "layers.csv").read_text()
    cached = derived_files(root / "store")
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert derived_files(root / "store") == cached and cached  # every analysis answered from the store
    assert caplog.text.count("up to date, nothing to do") == len(METHODS)  # the adapter is reused too
    assert (root / "results" / "layers.csv").read_text() == first

    assert main(["plot", "--store", str(root / "store"), "--model", "tiny-llama", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "layers.csv").read_text() == first
    assert (tmp_path / "comparison.csv").read_text() == (root / "results" / "comparison.csv").read_text()
    assert (tmp_path / "summary.md").read_text() == (root / "results" / "summary.md").read_text()
    assert (tmp_path / "layers.png").stat().st_size > 10_000 and (tmp_path / "training.png").exists()


def test_plot_says_what_is_not_analysed(study, capsys, tmp_path, tiny_model):
    root, args = study
    store = str(root / "store")
    assert main(["plot", "--store", store, "--model", "nope", "--out", str(tmp_path)]) == 1
    assert "no runs of model 'nope'" in capsys.readouterr().err
    dataset = args[args.index("--dataset") + 1]
    assert (
        main(
            [
                "ingest",
                "--store",
                store,
                "--model",
                str(tiny_model),
                "--dataset",
                dataset,
                "--methods",
                "3shot",
                "--per-subject",
                "60",
            ]
        )
        == 0
    )
    assert (
        main(["plot", "--store", store, "--model", "tiny-llama", "--methods", "0shot,3shot", "--out", str(tmp_path)])
        == 1
    )
    err = capsys.readouterr().err
    assert "no stored analyses (preset paper, every sample) for tiny-llama: 3shot layer 1, 3shot layer 2" in err
    assert (
        f"start `actstore serve --store {store}`, then run `actstore analyze tiny-llama --methods 0shot,3shot "
        "--layers 1:4`"
    ) in err  # no pair of the study among these methods
    assert not (tmp_path / "layers.csv").exists()


def test_the_job_on_a_bucket_store_gives_the_folder_store_results(study, bucket, tmp_path):
    """The same job (in-context arm) with its store in a bucket: served from the bucket, analysed by Dask
    workers reading it, the same tables as from the folder store."""
    root, args = study
    url = f"{bucket}/study"
    on_bucket = [
        *args[:1],
        "--store",
        url,
        "--results",
        str(tmp_path / "results"),
        *args[5:],
        "--methods",
        "0shot,5shot",
        "--no-finetune",
        "--compare",
        "0shot,5shot",
    ]
    assert main(on_bucket) == 0
    assert [r.method for r in Store(url).runs()] == ["0shot", "5shot"]
    ours = pd.read_csv(tmp_path / "results" / "layers.csv")
    folder = pd.read_csv(root / "results" / "layers.csv")
    pd.testing.assert_frame_equal(ours, folder[folder.method.isin(["0shot", "5shot"])].reset_index(drop=True))
    comparison = pd.read_csv(tmp_path / "results" / "comparison.csv")
    assert comparison.pair.unique().tolist() == ["0shot vs 5shot"]
    pd.testing.assert_frame_equal(
        comparison,
        pd.read_csv(root / "results" / "comparison.csv").query("pair == '0shot vs 5shot'").reset_index(drop=True),
    )
