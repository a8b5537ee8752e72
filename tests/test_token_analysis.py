"""Density analyses of token clouds: a capture run of every token reduced to a position, a mean per text, or a
seeded random sample of tokens, then ID and clusters (and the ARI with a label column), cached in the run."""

from __future__ import annotations

import numpy as np
import pytest

from actstore import testing
from actstore.analysis.tokens import Reduction, analyse_tokens, reduce_layer
from actstore.cli import main
from actstore.store import LabelNotFound, Store


@pytest.fixture(scope="module")
def token_run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    assert main(testing.token_capture_args(folder / "store", tiny_model, folder)) == 0
    return Store(folder / "store").run("tiny-llama", "0shot")


def test_reductions_pick_the_rows_they_name(token_run):
    states = token_run.read_states([2], site="mlp_out")[0].astype(np.float64)
    samples, positions = token_run.labels()["sample"], token_run.labels()["position"]
    ids = list(dict.fromkeys(samples.tolist()))  # texts in stored order
    last = np.array([np.nonzero(samples == i)[0][-1] for i in ids])
    first = np.array([np.nonzero(samples == i)[0][0] for i in ids])

    points, rows = reduce_layer(token_run, 2, Reduction.parse("last"), site="mlp_out")
    np.testing.assert_array_equal(rows, last)
    np.testing.assert_array_equal(points, states[last])
    points, rows = reduce_layer(token_run, 2, Reduction.parse("position:0"), site="mlp_out")
    np.testing.assert_array_equal(rows, first)
    assert (positions[rows] == 0).all()
    points, _ = reduce_layer(token_run, 2, Reduction.parse("mean"), site="mlp_out")
    np.testing.assert_allclose(points, np.stack([states[samples == i].mean(0) for i in ids]), rtol=1e-12)

    a, rows_a = reduce_layer(token_run, 2, Reduction.parse("sample:50:7"))
    b, rows_b = reduce_layer(token_run, 2, Reduction.parse("sample:50:7"))
    _, rows_c = reduce_layer(token_run, 2, Reduction.parse("sample:50:8"))
    np.testing.assert_array_equal(a, b)
    assert len(set(rows_a)) == 50 and not np.array_equal(rows_a, rows_c)


def test_a_token_cloud_is_analysed_with_a_label_and_cached(token_run):
    cloud = analyse_tokens(token_run, 2, Reduction.parse("sample:120:0"), label="topic")
    assert cloud.n_points <= 120 and 0 < cloud.id < 32 and cloud.n_clusters >= 1
    assert -1 <= cloud.ari <= 1 and len(cloud.assignment) == cloud.n_points == len(cloud.samples)
    again = analyse_tokens(token_run, 2, Reduction.parse("sample:120:0"), label="topic", compute=False)
    assert again.id == cloud.id and np.array_equal(again.assignment, cloud.assignment)
    per_text = analyse_tokens(token_run, 2, Reduction.parse("mean"), site="mlp_out")
    assert per_text.n_points <= 40 and per_text.ari is None and np.isfinite(per_text.id)


@pytest.mark.parametrize(
    ("reduction", "error", "words"),
    [("sample:100000", ValueError, "more tokens"), ("position:-500", ValueError, "beyond")],
)
def test_bad_reductions_are_refused_in_one_line(token_run, reduction, error, words):
    with pytest.raises(error, match=words):
        analyse_tokens(token_run, 1, Reduction.parse(reduction))


def test_a_label_the_run_lacks_is_named_with_the_labels_it_has(token_run):
    with pytest.raises(LabelNotFound, match="^run .* has no label 'nope'; its labels: .*topic"):
        analyse_tokens(token_run, 1, Reduction.parse("last"), label="nope")


def test_an_unknown_reduction_names_the_choices():
    with pytest.raises(ValueError, match="sample:N"):
        Reduction.parse("median")
