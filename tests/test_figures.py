"""The study's figures and `actstore plot`: labelled axes, a legend naming the methods, one y scale per metric,
a colour-blind-safe palette, PNG, SVG and PDF files; plot draws the analyses stored with the settings they were
computed with, says which, and when they are missing prints a command that computes them."""

from __future__ import annotations

import logging
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from matplotlib.colors import to_hex
from scipy.cluster.hierarchy import linkage

from actstore.analysis.density import PAPER
from actstore.analysis.layers import Mask
from actstore.analysis.scheduler import comparison_outcome, layer_outcome
from actstore.cli import main
from actstore.store import Store
from actstore.study import cli, figures
from actstore.study.report import STUDY, Settings, write_results
from actstore.testing import write_synthetic_run

ROOT = Path(__file__).resolve().parent.parent
MODEL = "m"
METHODS = ["0shot", "1shot", "5shot", "finetuned"]
PAIRS = ["0shot vs 5shot", "0shot vs finetuned"]
ARI_PANELS = ("ari_subject", "ari_answer", "ari_prediction")
YLABELS = ["intrinsic dimension", "clusters (count)", "adjusted Rand index", "label overlap", "data overlap"]
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}


def results_table(n_layers: int = 31) -> xr.Dataset:
    """A job's table as results_dataset makes it: subject ARI up to ~0.9, answer ARI ~0.005 (noise)."""
    rng = np.random.default_rng(0)
    runs, layers = [f"{MODEL}/{m}" for m in METHODS], range(1, n_layers)
    pairs = [f"{MODEL}/{a} vs {MODEL}/{b}" for a, b in (p.split(" vs ") for p in PAIRS)]
    shape = (len(runs), len(layers))
    ranges = {
        "id": (5, 12),
        "id_2nn": (5, 12),
        "core_fraction": (0.5, 1),
        "ari_subject": (0, 0.9),
        "ari_answer": (-0.005, 0.005),
        "ari_prediction": (0, 0.2),
        "overlap_subject": (0.4, 1),
        "overlap_answer": (0.24, 0.27),
    }
    data = {name: (("run", "layer"), rng.uniform(lo, hi, shape)) for name, (lo, hi) in ranges.items()}
    data["n_clusters"] = (("run", "layer"), rng.integers(1, 9, shape).astype(float))
    data["error"] = (("run", "layer"), np.full(shape, "", dtype=object))
    pair_shape = (len(pairs), len(layers))
    data |= {
        "n_common": (("pair", "layer"), np.full(pair_shape, 400.0)),
        "data_overlap": (("pair", "layer"), rng.uniform(0.3, 0.95, pair_shape)),
        "ari_clusters": (("pair", "layer"), rng.uniform(0, 0.5, pair_shape)),
        "compare_error": (("pair", "layer"), np.full(pair_shape, "", dtype=object)),
    }
    return xr.Dataset(data, coords={"run": runs, "pair": pairs, "layer": list(layers)})


def tree(_run: str, layer: int) -> dict | None:
    """A dendrogram of three density peaks at layer 2, none elsewhere."""
    if layer != 2:
        return None
    return {
        "labels": ["astronomy", "anatomy", "virology"],
        "majority_share": np.array([0.9, 0.6, 0.5]),
        "sizes": np.array([120, 80, 40]),
        "linkage": linkage(np.array([[0.0], [1.0], [3.0]])),
    }


def write(out: Path, settings: Settings = STUDY, fmt: str = "png") -> list[Path]:
    return write_results(
        out,
        MODEL,
        results_table(),
        dict.fromkeys(METHODS, 0.25),
        dict.fromkeys(METHODS, 400),
        tree,
        settings=settings,
        fmt=fmt,
    )


def drawn(fig) -> list:
    """The figure's panels, drawn (limits settled as in the file)."""
    fig.canvas.draw()
    return fig.axes


def table() -> xr.Dataset:
    from actstore.study.report import method_table

    return method_table(results_table(), MODEL)


@pytest.mark.parametrize("fmt", figures.FORMATS)
def test_each_format_is_written_and_valid(tmp_path, fmt):
    written = write(tmp_path, fmt=fmt)
    figures_written = [p for p in written if p.suffix == f".{fmt}"]
    assert [p.name for p in figures_written] == [f"layers.{fmt}", f"dendrogram-5shot-layer2.{fmt}"]
    for path, ylabels in zip(figures_written, (YLABELS, ["density peak: majority subject"])):
        data = path.read_bytes()
        if fmt == "svg":  # parses, and its text is text: every y label can be found
            texts = " ".join(t.strip() for t in ET.fromstring(data).itertext())
            assert all(label in texts for label in ylabels), texts
        else:
            assert data.startswith(MAGIC[fmt]) and len(data) > 10_000
    assert f"- `layers.{fmt}`" in (tmp_path / "summary.md").read_text()


def test_plot_offers_the_formats_the_figures_write():
    assert cli.FORMATS == figures.FORMATS


@pytest.mark.parametrize("draw", ["layers", "training", "dendrogram"])
def test_every_axis_is_labelled_and_a_legend_names_the_methods(draw):
    t = table()
    if draw == "layers":
        fig, names, title = figures.draw_layers(t, "title"), METHODS, "method"
    elif draw == "training":
        steps = t.assign_coords(method=[0, 1, 4, 15]).rename(method="step")
        fig, names, title = figures.draw_training(steps, "title"), ["0", "1", "4", "15"], "training step"
    else:
        fig, names, title = figures.draw_dendrogram(tree("", 2), "title", "5shot"), ["5shot"], "method"
    for ax in drawn(fig):
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    legend = next(lg for lg in legends if lg.get_title().get_text() == title)
    assert [t.get_text() for t in legend.get_texts()][: len(names)] == names


def test_the_pairs_have_their_own_legend_and_chance_is_keyed():
    fig = figures.draw_layers(table(), "title")
    overlap = drawn(fig)[-1]
    assert [t.get_text() for t in overlap.get_legend().get_texts()] == PAIRS
    assert overlap.get_ylabel().startswith("data overlap")
    assert "chance" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_panels_of_one_metric_share_one_y_scale():
    """The answer ARI (noise of +-0.005) is drawn on the subject ARI's scale (up to 0.9), not blown up."""
    axes = dict(zip(figures.LAYER_METRICS, drawn(figures.draw_layers(table(), "title"))))
    limits = {name: axes[name].get_ylim() for name in ARI_PANELS}
    assert len(set(limits.values())) == 1 and limits["ari_answer"][1] >= 0.85
    assert axes["overlap_subject"].get_ylim() == axes["overlap_answer"].get_ylim()
    assert axes["id"].get_ylim() != axes["ari_subject"].get_ylim()  # another metric keeps its own
    steps = table().assign_coords(method=[0, 1, 4, 15]).rename(method="step")
    training = dict(zip(figures.TRAINING_METRICS, drawn(figures.draw_training(steps, "title"))))
    assert len({training[name].get_ylim() for name in ARI_PANELS}) == 1


def test_lines_are_told_apart_without_colour_and_by_a_colour_blind_safe_palette():
    fig = figures.draw_layers(table(), "title")
    lines = drawn(fig)[0].get_lines()
    assert len(lines) == len(METHODS)
    assert {to_hex(line.get_color()).upper() for line in lines} <= set(figures.PALETTE)
    for prop in ("color", "marker", "linestyle"):
        assert len({str(getattr(line, f"get_{prop}")()) for line in lines}) == len(lines), prop


def test_the_summary_of_the_study_settings_is_the_study_summary(tmp_path):
    """Its opening, word for word as in the results page's summary (the numbers and their wording unchanged)."""
    write(tmp_path)
    opening = (tmp_path / "summary.md").read_text().splitlines()[2]
    assert opening in (ROOT / "docs" / "smollm2-summary.md").read_text()


def test_other_settings_are_stated_in_the_summary_and_figures(tmp_path):
    settings = Settings(PAPER.__class__(z=2.1, density_k=8), Mask(20))
    write(tmp_path, settings, "svg")
    summary = (tmp_path / "summary.md").read_text()
    assert "the first 20 samples of each subject analysed" in summary
    assert "the `paper` preset with density_k 8, z 2.1 (Gride ID at scale 16, kNN density k = 8, ADP Z = 2.1" in summary
    svg = " ".join(ET.parse(tmp_path / "layers.svg").getroot().itertext())
    assert "preset paper with density_k 8, z 2.1, first 20 per subject" in svg
    assert settings.flags() == ["--per-subject", "20", "--density-k", "8", "--z", "2.1"]


# ---- actstore plot on a store: the settings stored, and the advice when they are not ----

OTHER = Settings(PAPER.__class__(z=2.1), Mask(40))  # what a user analysed with `--per-subject 40 --z 2.1`
OTHER_FLAGS = ["--per-subject", "40", "--z", "2.1"]


def write_runs(root: Path, per_subject: int) -> Path:
    """Runs 0shot and 5shot of ``per_subject`` samples in each of 3 subjects, 3 layers, clustered by subject."""
    store = Store(root)
    rng = np.random.default_rng(1)
    n = 3 * per_subject
    subjects = np.repeat(["anatomy", "astronomy", "virology"], per_subject)
    labels = {
        "sample": np.arange(n),
        "subject": subjects.astype(object),
        "answer": rng.choice(list("ABCD"), n).astype(object),
        "prediction": rng.choice(list("ABCD"), n).astype(object),
        "correct": np.zeros(n, dtype=bool),
    }
    centres = rng.standard_normal((3, 16)) * 3
    for seed, method in enumerate(["0shot", "5shot"]):
        states = rng.standard_normal((3, n, 16)).astype(np.float32) + centres[np.repeat([0, 1, 2], per_subject)]
        write_synthetic_run(store, MODEL, method, states=states.astype(np.float32), labels=labels, seed=seed)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Two runs of 150 samples over 3 subjects, 3 layers, analysed (layers 1-2, and compared) with OTHER only."""
    root = write_runs(tmp_path_factory.mktemp("plot") / "store", per_subject=50)
    for layer in (1, 2):
        a, b = (layer_outcome(Store(root), MODEL, m, layer, OTHER.params, OTHER.mask) for m in ("0shot", "5shot"))
        assert not a.error and not b.error
        assert not comparison_outcome(Store(root), a, b, OTHER.params, OTHER.mask).error
    return root


def plot(store: Path, out: Path, *flags: str) -> int:
    return main(["plot", "--store", str(store), "--model", MODEL, "--out", str(out), *flags])


def test_plot_draws_the_analyses_stored_with_the_settings_named_and_says_which(store, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert plot(store, tmp_path, *OTHER_FLAGS, "--format", "pdf") == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plot: ")]
    assert said == ["plot: drawing the analyses stored with preset paper with z 2.1, first 40 per subject"]
    assert (tmp_path / "layers.pdf").read_bytes().startswith(b"%PDF-")
    assert "the first 40 samples of each subject analysed" in (tmp_path / "summary.md").read_text()


def test_settings_the_runs_are_too_small_for_are_not_advised(store, tmp_path, capsys):
    assert plot(store, tmp_path, "--maxk", "150") == 1
    err = capsys.readouterr().err
    assert "no stored analyses (preset paper with maxk 150, every sample)" in err
    assert "cannot be computed: they need more than 150 samples per run and m/0shot holds 150" in err
    assert "actstore analyze" not in err


@pytest.mark.server
def test_plot_without_the_study_settings_prints_a_command_that_computes_them(store, tmp_path, capsys, caplog):
    """The study's settings are not stored: plot says so, and the commands it prints make them, after which
    plot draws them by default and the other settings still with their flags."""
    from actstore.server.process import ServerProcess

    assert plot(store, tmp_path / "a") == 1
    err = capsys.readouterr().err
    assert "no stored analyses (preset paper, every sample) for m: 0shot layer 1, 0shot layer 2" in err
    serve, analyze = (shlex.split(c) for c in re.findall(r"`(actstore (?:serve|analyze) [^`]+)`", err))
    assert serve == ["actstore", "serve", "--store", str(store)]
    assert analyze == [
        "actstore",
        "analyze",
        MODEL,
        "--methods",
        "0shot,5shot",
        "--layers",
        "1:3",
        "--compare",
        "0shot,5shot",
    ]
    with ServerProcess(store, tmp_path / "server.log", "--dask-workers", "1") as server:
        assert main([*analyze[1:], "--address", server.address]) == 0
        assert server.stop() == 0
    with caplog.at_level(logging.INFO):
        assert plot(store, tmp_path / "b") == 0
    assert "plot: drawing the analyses stored with preset paper, every sample (the study's settings" in caplog.text
    assert "every stored sample analysed" in (tmp_path / "b" / "summary.md").read_text()
    assert plot(store, tmp_path / "c", *OTHER_FLAGS) == 0
    assert (tmp_path / "b" / "layers.csv").read_text() != (tmp_path / "c" / "layers.csv").read_text()


@pytest.mark.server
def test_plot_finds_what_analyze_computed_on_runs_too_small_for_the_study_settings(tmp_path, caplog, capsys):
    """analyze fits the neighbour counts it is not given to runs of 100 samples or fewer; plot, asked with the
    same flags, looks up those fitted settings rather than advising a command that cannot help."""
    from actstore.server.process import ServerProcess

    root = write_runs(tmp_path / "store", per_subject=20)
    assert plot(root, tmp_path / "a") == 1
    err = capsys.readouterr().err
    assert "cannot be computed" not in err
    (analyze,) = (shlex.split(c) for c in re.findall(r"`(actstore analyze [^`]+)`", err))
    with ServerProcess(root, tmp_path / "server.log", "--dask-workers", "1") as server:
        assert main([*analyze[1:], "--address", server.address]) == 0
        assert server.stop() == 0
    with caplog.at_level(logging.INFO):
        assert plot(root, tmp_path / "b") == 0
    assert "maxk 59" in caplog.text and "fitted to runs this small" in caplog.text
    assert "data overlap k = 30" in (tmp_path / "b" / "summary.md").read_text()
