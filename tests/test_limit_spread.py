"""``--limit`` keeps every asked subject: spread as evenly as the subjects' sizes allow, for ingest,
finetune and study, and a selection that would leave an asked subject empty is refused with one line."""

from collections import Counter

import pytest

from actstore.cli import main
from actstore.finetune.options import FinetuneOptions
from actstore.finetune.train import Finetune
from actstore.ingest.datasets import DatasetError, load_dataset
from actstore.ingest.selection import select, share_out
from actstore.store import Store
from actstore.testing import make_questions, write_jsonl


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """3 subjects x 136 questions: 111 probed per subject once 25 are held out."""
    return write_jsonl(
        tmp_path_factory.mktemp("big") / "q.jsonl", [r for seed in range(4) for r in make_questions(seed)]
    )


def test_share_out_is_even_as_sizes_allow_and_grows_monotonically():
    assert share_out({"a": 100, "b": 100}, 60) == {"a": 30, "b": 30}
    assert share_out({"a": 5, "b": 100, "c": 100}, 61) == {"a": 5, "b": 28, "c": 28}
    assert share_out({"a": 3, "b": 3}, None) == {"a": 3, "b": 3}
    assert share_out({"a": 10, "b": 10, "c": 10}, 2) == {"a": 1, "b": 1, "c": 0}
    previous = dict.fromkeys("abc", 0)
    for limit in range(1, 40):
        counts = share_out({"a": 4, "b": 20, "c": 9}, limit)
        assert sum(counts.values()) == min(limit, 33) and all(counts[s] >= previous[s] for s in counts)
        previous = counts


def test_ingest_limit_60_over_two_subjects_stores_30_and_30(tiny_model, big_file, tmp_path):
    store = tmp_path / "store"
    args = [
        "ingest",
        "--store",
        str(store),
        "--model",
        str(tiny_model),
        "--dataset",
        str(big_file),
        "--dtype",
        "float32",
        "--subjects",
        "anatomy,astronomy",
        "--limit",
        "60",
    ]
    assert main(args) == 0
    run = Store(store).run("tiny-llama", "0shot")
    assert Counter(run.labels()["subject"]) == {"anatomy": 30, "astronomy": 30}
    assert run.attrs["history"][-1]["selection"]["subjects"] == ["anatomy", "astronomy"]
    # a larger limit appends to what is stored, still even
    assert main([*args[:-1], "80"]) == 0
    assert Counter(Store(store).run("tiny-llama", "0shot").labels()["subject"]) == {"anatomy": 40, "astronomy": 40}


def test_a_limit_that_would_leave_an_asked_subject_empty_is_refused_with_one_line(
    tiny_model, questions_file, tmp_path, capsys
):
    store = tmp_path / "store"
    assert (
        main(
            [
                "ingest",
                "--store",
                str(store),
                "--model",
                str(tiny_model),
                "--dataset",
                str(questions_file),
                "--subjects",
                "anatomy,astronomy,college_biology",
                "--limit",
                "2",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "college_biology would hold no questions" in err and err.count("\n") == 1
    assert not store.exists() or not Store(store).runs()
    with pytest.raises(DatasetError, match="astronomy would hold no questions"):
        select(load_dataset(questions_file), ["anatomy", "astronomy"], per_subject=None, limit=1)


def test_without_subjects_a_small_limit_covers_the_first_subjects(questions_file):
    selection = select(load_dataset(questions_file), limit=2)
    assert Counter(q.subject for q in selection.queries) == {"anatomy": 1, "astronomy": 1}
    assert selection.description["subjects"] == ["anatomy", "astronomy"]
    assert Counter(q.subject for q in select(load_dataset(questions_file), limit=4).queries) == {
        "anatomy": 2,
        "astronomy": 1,
        "college_biology": 1,
    }


def test_finetune_limit_spreads_the_training_questions(tiny_model, questions_file, tmp_path):
    finetune = Finetune(
        FinetuneOptions(out=tmp_path / "sft", model=str(tiny_model), dataset=str(questions_file), limit=30)
    )
    assert Counter(q.subject for q in finetune.questions) == {"anatomy": 10, "astronomy": 10, "college_biology": 10}
    assert "at most 30 in all" in finetune.recipe["training_questions"]


def test_study_limit_reaches_the_ingest(tiny_model, big_file, tmp_path):
    import argparse

    from actstore.ingest.pipeline import Ingest
    from actstore.study.cli import register
    from actstore.study.job import StudyOptions, ingest_options

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["study", "--store", str(tmp_path / "s"), "--limit", "60"])
    assert args.limit == 60
    opts = StudyOptions(
        store=tmp_path / "s",
        model=str(tiny_model),
        dataset=str(big_file),
        subjects=["anatomy", "astronomy"],
        limit=args.limit,
    )
    selection = Ingest(ingest_options(opts)).selection
    assert Counter(q.subject for q in selection.queries) == {"anatomy": 30, "astronomy": 30}
