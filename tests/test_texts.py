"""Text datasets for ingest: JSONL, CSV, Parquet and save_to_disk folders read to the same texts and labels,
templates filled from the columns, and every fault a one-line DatasetError naming what is wrong."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from actstore.ingest.datasets import DatasetError
from actstore.ingest.texts import Text, TextDataset, label_arrays, load_texts
from actstore.store.run import MAX_LABEL_CHARS

ROWS = [
    {"question": "What is 2+2?", "answer": "4", "topic": "maths", "level": 1, "score": 0.5, "hard": False},
    {
        "question": "Capital of France?",
        "answer": "Paris",
        "topic": "geography",
        "level": 2,
        "score": 0.75,
        "hard": True,
    },
    {"question": "What is 2+2?", "answer": "4", "topic": "maths", "level": 3, "score": 1.0, "hard": False},
]
EXPECTED = [
    Text(0, "What is 2+2?", {"answer": "4", "topic": "maths"}),
    Text(1, "Capital of France?", {"answer": "Paris", "topic": "geography"}),
    Text(2, "What is 2+2?", {"answer": "4", "topic": "maths"}),  # the same text again: kept, under its own id
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    with path.open("w", encoding="utf-8-sig", newline="") as handle:  # with the byte-order mark spreadsheets write
        writer = csv.DictWriter(handle, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def hf_dataset(rows: list[dict]):
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict({column: [row[column] for row in rows] for column in rows[0]})


def write_saved(path: Path, rows: list[dict]) -> Path:
    hf_dataset(rows).save_to_disk(str(path))
    return path


WRITERS = {
    "jsonl": lambda tmp: write_jsonl(tmp / "data.jsonl", ROWS),
    "json": lambda tmp: write_jsonl(tmp / "data.json", ROWS),
    "csv": lambda tmp: write_csv(tmp / "data.csv", ROWS),
    "parquet": lambda tmp: write_parquet(tmp / "data.parquet", ROWS),
    "saved": lambda tmp: write_saved(tmp / "saved", ROWS),
}
TYPED = ["jsonl", "parquet", "saved"]  # the formats that keep the values' types (CSV holds strings)


@contextlib.contextmanager
def refused(*words: str) -> Iterator[pytest.ExceptionInfo[DatasetError]]:
    """The block must raise a DatasetError of one line naming every word."""
    with pytest.raises(DatasetError) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_format_reads_to_the_same_texts_and_labels(tmp_path, kind):
    path = WRITERS[kind](tmp_path)
    dataset = load_texts(path, text_column="question", label_columns=["answer", "topic"])
    assert isinstance(dataset, TextDataset)
    assert dataset.texts == EXPECTED
    assert dataset.label_columns == ["answer", "topic"]
    assert dataset.name == path.name


@pytest.mark.parametrize("kind", TYPED)
def test_typed_formats_keep_int_float_and_bool_labels(tmp_path, kind):
    dataset = load_texts(WRITERS[kind](tmp_path), text_column="question", label_columns=["level", "score", "hard"])
    assert [t.labels for t in dataset.texts] == [
        {"level": 1, "score": 0.5, "hard": False},
        {"level": 2, "score": 0.75, "hard": True},
        {"level": 3, "score": 1.0, "hard": False},
    ]
    assert [type(v) for v in dataset.texts[1].labels.values()] == [int, float, bool]
    arrays = label_arrays(dataset.texts, ["level", "score", "hard"])
    assert arrays["level"].dtype == np.int64 and arrays["level"].tolist() == [1, 2, 3]
    assert arrays["score"].dtype == np.float64 and arrays["score"].tolist() == [0.5, 0.75, 1.0]
    assert arrays["hard"].dtype == np.bool_ and arrays["hard"].tolist() == [False, True, False]


def test_csv_values_are_strings(tmp_path):
    dataset = load_texts(write_csv(tmp_path / "d.csv", ROWS), text_column="question", label_columns=["level", "hard"])
    assert dataset.texts[1].labels == {"level": "2", "hard": "True"}


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "saved"])
def test_a_template_is_filled_from_each_row(tmp_path, kind):
    dataset = load_texts(WRITERS[kind](tmp_path), template="Q: {question}\nA: {answer} ({topic})")
    assert [t.text for t in dataset.texts] == [
        "Q: What is 2+2?\nA: 4 (maths)",
        "Q: Capital of France?\nA: Paris (geography)",
        "Q: What is 2+2?\nA: 4 (maths)",
    ]
    assert [t.id for t in dataset.texts] == [0, 1, 2]
    assert dataset.texts[0].labels == {} and dataset.label_columns == []


def test_a_template_keeps_format_specs(tmp_path):
    dataset = load_texts(write_jsonl(tmp_path / "d.jsonl", ROWS), template="{score:.2f} {level:03d} {question!r}")
    assert dataset.texts[1].text == "0.75 002 'Capital of France?'"


def test_ids_are_row_indices_blank_lines_skipped_and_sha256_is_of_the_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    dataset = load_texts(path, text_column="question")
    assert [(t.id, t.text) for t in dataset.texts] == [(0, "What is 2+2?"), (1, "Capital of France?")]
    assert dataset.sha256 == hashlib.sha256(b"d.jsonl\0" + path.read_bytes()).hexdigest()
    write_jsonl(path, ROWS)
    assert load_texts(path, text_column="question").sha256 != dataset.sha256


def test_a_saved_folder_hashes_its_files(tmp_path):
    folder = write_saved(tmp_path / "saved", ROWS)
    expected = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        expected.update(file.name.encode() + b"\0" + file.read_bytes())
    assert load_texts(folder, text_column="question").sha256 == expected.hexdigest()


def test_missing_labels_are_none_and_become_empty_strings_or_nan(tmp_path):
    rows = [
        {"question": "a", "topic": "maths", "score": 0.5},
        {"question": "b", "topic": None, "score": None},
        {"question": "c"},  # JSONL: keys absent
    ]
    dataset = load_texts(
        write_jsonl(tmp_path / "d.jsonl", rows), text_column="question", label_columns=["topic", "score"]
    )
    assert [t.labels for t in dataset.texts] == [
        {"topic": "maths", "score": 0.5},
        {"topic": None, "score": None},
        {"topic": None, "score": None},
    ]
    arrays = label_arrays(dataset.texts, ["topic", "score"])
    assert arrays["topic"].dtype == object and arrays["topic"].tolist() == ["maths", "", ""]
    assert arrays["score"][0] == 0.5 and math.isnan(arrays["score"][1]) and math.isnan(arrays["score"][2])


def test_int_and_float_in_one_column_are_floats():
    texts = [Text(0, "a", {"x": 1}), Text(1, "b", {"x": 2.5})]
    array = label_arrays(texts, ["x"])["x"]
    assert array.dtype == np.float64 and array.tolist() == [1.0, 2.5]


# -- refusals: one line each, naming the offending thing


def test_a_missing_path_is_refused(tmp_path):
    with refused("dataset not found", "nope.jsonl"):
        load_texts(tmp_path / "nope.jsonl", text_column="question")


def test_an_unknown_suffix_is_refused_naming_the_known_ones(tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    with refused("'.txt'", ".jsonl", ".json", ".csv", ".parquet", "save_to_disk"):
        load_texts(tmp_path / "data.txt", text_column="question")


def test_a_folder_not_written_by_save_to_disk_is_refused(tmp_path):
    with refused(str(tmp_path), "save_to_disk", "state.json"):
        load_texts(tmp_path, text_column="question")


def test_a_dataset_dict_folder_is_refused_naming_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = hf_dataset(ROWS)
    datasets.DatasetDict({"train": data, "test": data}).save_to_disk(str(tmp_path / "dd"))
    with refused("DatasetDict", "train, test", str(tmp_path / "dd" / "train")):
        load_texts(tmp_path / "dd", text_column="question")
    assert len(load_texts(tmp_path / "dd" / "test", text_column="question").texts) == 3  # a split's folder reads


def test_without_the_datasets_package_a_saved_folder_says_what_to_install(tmp_path, monkeypatch):
    folder = write_saved(tmp_path / "saved", ROWS)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with refused("datasets", "pip install datasets", str(folder)):
        load_texts(folder, text_column="question")


def test_without_pyarrow_a_parquet_file_says_what_to_install(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with refused("pyarrow", "pip install pyarrow", str(path)):
        load_texts(path, text_column="question")


@pytest.mark.parametrize("kind", list(WRITERS))
def test_an_unknown_text_column_is_refused_listing_the_columns(tmp_path, kind):
    with refused("'prompt'", "text column", "question, answer, topic, level, score, hard"):
        load_texts(WRITERS[kind](tmp_path), text_column="prompt")


def test_an_unknown_label_column_is_refused_listing_the_columns(tmp_path):
    with refused("'subject'", "label column", "question, answer"):
        load_texts(write_jsonl(tmp_path / "d.jsonl", ROWS), text_column="question", label_columns=["topic", "subject"])


def test_at_most_20_columns_are_listed(tmp_path):
    columns = [f"c{i}" for i in range(30)]
    path = write_csv(tmp_path / "wide.csv", [dict.fromkeys(columns, "v")])
    with refused("'text'", "c0, c1,", "c19, ...", "30 in all") as info:
        load_texts(path, text_column="text")
    assert "c20" not in str(info.value)


def test_a_template_naming_a_missing_column_is_refused_before_the_rows_are_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\nnot json\n", encoding="utf-8")  # row 1 is never reached
    with refused("'subject'", "template", "question, answer, topic"):
        load_texts(path, template="{question} about {subject}")


@pytest.mark.parametrize("template", ["Q: {}", "Q: {0}", "{question} {1}"])
def test_a_template_with_positional_fields_is_refused(tmp_path, template):
    with refused("positional", "name a column"):
        load_texts(write_jsonl(tmp_path / "d.jsonl", ROWS), template=template)


def test_a_template_with_bad_syntax_is_refused(tmp_path):
    with refused("template", "format string", "'Q: {question'"):
        load_texts(write_jsonl(tmp_path / "d.jsonl", ROWS), template="Q: {question")


@pytest.mark.parametrize(("text_column", "template", "word"), [(None, None, "neither"), ("question", "{x}", "both")])
def test_exactly_one_of_text_column_and_template(tmp_path, text_column, template, word):
    with refused("text_column", "template", word):
        load_texts(write_jsonl(tmp_path / "d.jsonl", ROWS), text_column=text_column, template=template)


def test_a_dataset_without_rows_is_refused(tmp_path):
    with refused("no rows", "empty.jsonl"):
        load_texts(write_jsonl(tmp_path / "empty.jsonl", []), text_column="question")
    with refused("no rows", "header.csv"):
        load_texts(write_csv(tmp_path / "header.csv", [], columns=["question"]), text_column="question")
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    pyarrow.parquet.write_table(
        pyarrow.table({"question": pyarrow.array([], pyarrow.string())}), tmp_path / "e.parquet"
    )
    with refused("no rows", "e.parquet"):
        load_texts(tmp_path / "e.parquet", text_column="question")


@pytest.mark.parametrize(
    ("value", "words"),
    [("", ("row 1", "'question'", "empty")), ("   ", ("row 1", "empty")), (5, ("row 1", "int", "not a string"))],
)
def test_a_row_with_an_empty_or_non_string_text_is_refused(tmp_path, value, words):
    rows = [ROWS[0], {**ROWS[1], "question": value}, ROWS[2]]
    with refused(*words):
        load_texts(write_jsonl(tmp_path / "d.jsonl", rows), text_column="question")


def test_a_row_without_the_text_is_refused(tmp_path):
    rows = [ROWS[0], ROWS[1], {"answer": "4"}]
    with refused("row 2", "'question'", "missing"):
        load_texts(write_jsonl(tmp_path / "d.jsonl", rows), text_column="question")
    with refused("row 2", "'question'", "template"):
        load_texts(write_jsonl(tmp_path / "d.jsonl", rows), template="Q: {question}")


def test_an_empty_csv_cell_as_text_is_refused(tmp_path):
    rows = [{"question": "a", "topic": ""}, {"question": "", "topic": "x"}]
    path = write_csv(tmp_path / "d.csv", rows)
    assert load_texts(path, template="{question}{topic}").texts[1].text == "x"
    with refused("row 1", "'question'", "empty"):
        load_texts(path, text_column="question", label_columns=["topic"])


def test_a_label_longer_than_a_run_stores_is_refused(tmp_path):
    rows = [ROWS[0], ROWS[1], {**ROWS[2], "topic": "x" * (MAX_LABEL_CHARS + 1)}]
    with refused("row 2", "'topic'", f"{MAX_LABEL_CHARS + 1:,} characters", str(MAX_LABEL_CHARS)):
        load_texts(write_jsonl(tmp_path / "d.jsonl", rows), text_column="question", label_columns=["topic"])
    rows[2]["topic"] = "x" * MAX_LABEL_CHARS  # at the limit: kept
    dataset = load_texts(write_jsonl(tmp_path / "d.jsonl", rows), text_column="question", label_columns=["topic"])
    assert dataset.texts[2].labels["topic"] == "x" * MAX_LABEL_CHARS


@pytest.mark.parametrize(("value", "kind"), [([1, 2], "list"), ({"a": 1}, "dict")])
def test_a_label_that_is_not_a_scalar_is_refused(tmp_path, value, kind):
    rows = [{**ROWS[0], "topic": value}, ROWS[1]]
    with refused("row 0", "'topic'", kind, "str, int, float or bool"):
        load_texts(write_jsonl(tmp_path / "d.jsonl", rows), text_column="question", label_columns=["topic"])


def test_a_label_column_mixing_types_is_refused(tmp_path):
    rows = [ROWS[0], {**ROWS[1], "level": "two"}, ROWS[2]]
    with refused("'level'", "mixes", "int (first in row 0)", "str (first in row 1)"):
        load_texts(write_jsonl(tmp_path / "d.jsonl", rows), text_column="question", label_columns=["level"])
    with refused("'x'", "mixes", "bool", "int"):
        label_arrays([Text(0, "a", {"x": True}), Text(1, "b", {"x": 2})], ["x"])


def test_a_missing_int_or_bool_label_is_refused(tmp_path):
    rows = [ROWS[0], {**ROWS[1], "level": None}, ROWS[2]]
    with refused("'level'", "int", "row 1"):
        load_texts(write_jsonl(tmp_path / "d.jsonl", rows), text_column="question", label_columns=["level"])


def test_a_bad_jsonl_line_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    with refused(f"{path}:2", "JSON object"):
        load_texts(path, text_column="question")
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n", encoding="utf-8")
    with refused(f"{path}:2", "not valid JSON"):
        load_texts(path, text_column="question")


def test_a_file_that_is_not_parquet_is_refused(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "d.parquet").write_text("not parquet")
    with refused("d.parquet", "Parquet"):
        load_texts(tmp_path / "d.parquet", text_column="question")
