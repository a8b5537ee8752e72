"""The study's prompt format (Doimo et al. 2024), character for character.

The following are multiple choice questions (with answers) about {subject words}.\\n\\n
{shot question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n     (k times)
{query question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from actstore.ingest.datasets import LETTERS, Question

PROMPT_FORMAT = "doimo2024-mmlu-v1"


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_block(q: Question) -> str:
    """The question with its lettered choices, ending in ``Answer:`` (the token whose state is kept)."""
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    return f"{q.question}{options}\nAnswer:"


def shot_block(q: Question) -> str:
    return f"{question_block(q)} {q.answer}\n\n"


def shot_order(shots: Sequence[Question], query_id: int, seed: int | None) -> list[Question]:
    """The shots in the order shown to one query: a permutation seeded by (seed, query id), or fixed.

    Seeding per query, rather than drawing from one generator in sequence, makes every prompt
    independent of processing order, so resumed and appended ingests build identical prompts.
    """
    if seed is None:
        return list(shots)
    order = np.random.default_rng([seed, query_id]).permutation(len(shots))
    return [shots[i] for i in order]


def build_prompt(query: Question, shots: Sequence[Question], seed: int | None) -> str:
    examples = "".join(shot_block(s) for s in shot_order(shots, query.id, seed))
    return header(query.subject) + examples + question_block(query)
