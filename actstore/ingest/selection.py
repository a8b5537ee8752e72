"""Which questions a run holds, which serve as in-context examples or fine-tuning examples, and in what
order they are stored."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from actstore.ingest.datasets import Dataset, DatasetError, Question
from actstore.ingest.prompts import question_block

SHOT_POOL_SIZE = 5  # the size of MMLU's dev split per subject
TRAIN_POOL_SIZE = 20  # the study fine-tuned on at most 20 dev + validation questions per subject
EVAL_PER_SUBJECT = 2  # of each subject's training pool, questions kept to measure held-out accuracy instead


@dataclass
class Selection:
    queries: list[Question]
    shot_pool: dict[str, list[Question]]
    shot_source: str
    train: list[Question]  # the fine-tuning pool of the selected subjects, never among the queries
    train_split: str  # "test" when held out of the test split (then disjoint from queries by id), else "dev+val"
    description: dict

    def shots(self, subject: str, k: int) -> list[Question]:
        return self.shot_pool[subject][:k]


def select(
    dataset: Dataset,
    subjects: list[str] | None = None,
    per_subject: int | None = None,
    limit: int | None = None,
    train_pool: int = TRAIN_POOL_SIZE,
) -> Selection:
    """Pick the query questions, the shot pool and the fine-tuning questions.

    Without a dev split, the first SHOT_POOL_SIZE questions of every subject become the shot pool and
    the next ``train_pool`` the fine-tuning pool; both are excluded from the queries of every method
    (0-shot included, fine-tuned or not), so all methods of a model hold the same questions and compare
    sample by sample, and no fine-tuned model is probed on a question it was trained on.
    """
    if train_pool < 0:
        raise DatasetError(f"the training pool must hold 0 or more questions per subject, got {train_pool}")
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
        train = {s: (dataset.dev.get(s, []) + dataset.val.get(s, []))[:train_pool] for s in by_subject}
        train_split = "dev+val"
    else:
        held_out = SHOT_POOL_SIZE + train_pool
        pool = {s: qs[:SHOT_POOL_SIZE] for s, qs in by_subject.items()}
        train = {s: qs[SHOT_POOL_SIZE:held_out] for s, qs in by_subject.items()}
        by_subject = {s: qs[held_out:] for s, qs in by_subject.items()}
        source = "held out: the first 5 test questions of each subject, excluded from every method's queries"
        train_split = "test"
    queries = _spread({s: qs[:per_subject] for s, qs in by_subject.items()}, limit, asked=bool(subjects))
    if not queries:
        raise DatasetError("the selection holds no questions (check --subjects, --per-subject and --limit)")
    description = {"subjects": sorted({q.subject for q in queries}), "per_subject": per_subject, "limit": limit}
    return Selection(
        queries=queries,
        shot_pool=pool,
        shot_source=source,
        train=[q for s in sorted(train) for q in train[s]],
        train_split=train_split,
        description=description,
    )


def _spread(by_subject: dict[str, list[Question]], limit: int | None, asked: bool) -> list[Question]:
    """The first questions of every subject, ``limit`` in all spread as evenly as the subjects' sizes allow
    (a subject short of its share leaves the rest to the others), subjects in name order.

    A limit cut by question id instead filled the first subject and left the others empty while the run's
    history named them all. An asked subject left with no question is refused, so a subject-level analysis
    never silently lacks a subject; without ``--subjects``, a small limit covers the first subjects only.
    """
    counts = share_out({s: len(qs) for s, qs in by_subject.items()}, limit)
    empty = sorted(s for s, n in counts.items() if n == 0)
    if asked and empty:
        why = (
            f"--limit {limit} is fewer than the {len(counts)} subjects asked"
            if limit is not None and limit < len(counts)
            else "no question is left to probe"
        )
        raise DatasetError(
            f"subject(s) {', '.join(empty[:5])} would hold no questions ({why}); ask fewer subjects or more questions"
        )
    return [q for s in sorted(by_subject) for q in by_subject[s][: counts[s]]]


def share_out(sizes: dict[str, int], limit: int | None) -> dict[str, int]:
    """How many of each subject's ``sizes`` to take for ``limit`` in all: equal shares, the remainder to the
    first subjects by name, a subject's unused share passed on (water-filling). Growing ``limit`` never
    shrinks a share, so an ingest appended with a larger limit keeps what a smaller one stored."""
    if limit is None or limit >= sum(sizes.values()):
        return dict(sizes)
    counts = dict.fromkeys(sizes, 0)
    left, open_ = limit, sorted(s for s in sizes if sizes[s] > 0)
    while left and open_:
        share, extra = divmod(left, len(open_))
        for i, s in enumerate(open_):
            take = min(share + (i < extra), sizes[s] - counts[s])
            counts[s] += take
            left -= take
        open_ = [s for s in open_ if counts[s] < sizes[s]]
    return counts


def split_train_eval(train: list[Question], eval_per_subject: int) -> tuple[list[Question], list[Question]]:
    """The fine-tuning pool split per subject: the last ``eval_per_subject`` questions of each subject's pool
    measure held-out accuracy (never trained on, and held out of every method's queries with the pool), the
    rest are trained on."""
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for q in train:
        by_subject[q.subject].append(q)
    cut = {s: max(len(qs) - eval_per_subject, 0) for s, qs in by_subject.items()}
    return (
        [q for s in sorted(by_subject) for q in by_subject[s][: cut[s]]],
        [q for s in sorted(by_subject) for q in by_subject[s][cut[s] :]],
    )


def train_source(selection: Selection, train_pool: int) -> str:
    """The recipe's words for where fine-tuning questions come from (and so which queries they exclude)."""
    if selection.train_split == "test":
        return (
            f"held out: the {train_pool} test questions after the shot pool in each subject, excluded from "
            "every method's queries"
        )
    return f"dev+val splits: the first {train_pool} questions of each subject"


def storage_order(queries: list[Question]) -> list[Question]:
    """The order samples are stored in: by subject, then question length, then id.

    Neighbouring samples then have prompts of nearly equal length (same subject means the same shots),
    so batches of consecutive samples pad little, and the order is the same for every method and model.
    """
    return sorted(queries, key=lambda q: (q.subject, len(question_block(q)), q.id))
