"""The prompt text equals the study's format character for character."""

from actstore.ingest.datasets import Question
from actstore.ingest.prompts import build_prompt, shot_order

Q = Question(7, "high_school_biology", "What is DNA?", ("a sugar", "a nucleic acid", "a lipid", "a protein"), "B")
S1 = Question(1, "high_school_biology", "Cells are?", ("units", "atoms", "stars", "rocks"), "A")
S2 = Question(2, "high_school_biology", "ATP stores?", ("light", "water", "energy", "salt"), "C")

HEADER = "The following are multiple choice questions (with answers) about high school biology.\n\n"
QUERY = "What is DNA?\nA. a sugar\nB. a nucleic acid\nC. a lipid\nD. a protein\nAnswer:"


def test_zero_shot_prompt_is_the_study_format():
    assert build_prompt(Q, [], 42) == HEADER + QUERY


def test_k_shot_prompt_is_the_study_format():
    expected = (
        HEADER
        + "Cells are?\nA. units\nB. atoms\nC. stars\nD. rocks\nAnswer: A\n\n"
        + "ATP stores?\nA. light\nB. water\nC. energy\nD. salt\nAnswer: C\n\n"
        + QUERY
    )
    assert build_prompt(Q, [S1, S2], None) == expected


def test_shot_order_is_seeded_per_query_and_a_permutation():
    shots = [Question(i, "x", f"q{i}", ("a", "b", "c", "d"), "A") for i in range(5)]
    first = shot_order(shots, 11, 42)
    assert first == shot_order(shots, 11, 42)  # reproducible whatever ran before
    assert sorted(q.id for q in first) == list(range(5))
    orders = {tuple(q.id for q in shot_order(shots, qid, 42)) for qid in range(20)}
    assert len(orders) > 1  # shuffled per query, not one fixed order
    assert shot_order(shots, 11, None) == shots
