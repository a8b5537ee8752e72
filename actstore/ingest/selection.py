"""Which questions a run holds, which serve as in-context examples, and in what order they are stored."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from actstore.ingest.datasets import Dataset, DatasetError, Question
from actstore.ingest.prompts import question_block

SHOT_POOL_SIZE = 5  # the size of MMLU's dev split per subject


@dataclass
class Selection:
    queries: list[Question]
    shot_pool: dict[str, list[Question]]
    shot_source: str
    description: dict

    def shots(self, subject: str, k: int) -> list[Question]:
        return self.shot_pool[subject][:k]


def select(
    dataset: Dataset,
    subjects: list[str] | None = None,
    per_subject: int | None = None,
    limit: int | None = None,
) -> Selection:
    """Pick the query questions and the shot pool.

    Without a dev split, the first SHOT_POOL_SIZE questions of every subject become the shot pool
    and are excluded from the queries of every method (0-shot included), so all methods of a model
    hold the same questions and compare sample by sample.
    """
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for q in dataset.questions:
        by_subject[q.subject].append(q)
    if subjects:
        unknown = sorted(set(subjects) - set(by_subject))
        if unknown:
            raise DatasetError(
                f"unknown subject(s) {', '.join(unknown)}; the dataset has: {', '.join(sorted(by_subject))}"
            )
        by_subject = {s: by_subject[s] for s in subjects}
    if dataset.dev:
        pool = {s: dataset.dev.get(s, [])[:SHOT_POOL_SIZE] for s in by_subject}
        source = "dev split: the first 5 questions of each subject"
    else:
        pool = {s: qs[:SHOT_POOL_SIZE] for s, qs in by_subject.items()}
        by_subject = {s: qs[SHOT_POOL_SIZE:] for s, qs in by_subject.items()}
        source = "held out: the first 5 test questions of each subject, excluded from every method's queries"
    queries = [q for s in sorted(by_subject) for q in by_subject[s][:per_subject]]
    if limit is not None:
        queries = sorted(queries, key=lambda q: q.id)[:limit]
    if not queries:
        raise DatasetError("the selection holds no questions (check --subjects, --per-subject and --limit)")
    description = {"subjects": sorted(by_subject), "per_subject": per_subject, "limit": limit}
    return Selection(queries=queries, shot_pool=pool, shot_source=source, description=description)


def storage_order(queries: list[Question]) -> list[Question]:
    """The order samples are stored in: by subject, then question length, then id.

    Neighbouring samples then have prompts of nearly equal length (same subject means the same shots),
    so batches of consecutive samples pad little, and the order is the same for every method and model.
    """
    return sorted(queries, key=lambda q: (q.subject, len(question_block(q)), q.id))
