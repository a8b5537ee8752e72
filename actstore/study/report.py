"""Writing a study's results: CSV tables, the figures and ``summary.md`` (accuracy, transition layer).

The input is the table of an analysis job (metrics over (run, layer), comparisons over (pair, layer)),
whether it came from a server (``actstore study``) or from a store (``actstore plot``), and the settings it
was analysed with, which the summary and the figures state.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from actstore.analysis.compare import OVERLAP_K
from actstore.analysis.density import PAPER, DensityParams
from actstore.analysis.layers import Mask
from actstore.analysis.params import compare_k_for, fitted
from actstore.study import figures

log = logging.getLogger(__name__)

Dendrograms = Callable[[str, int], "dict[str, Any] | None"]  # (run "model/method", layer) -> tree or None
MIN_SUBJECT_ARI = 0.05  # below this peak there is no subject clustering whose end could be placed
ANALYZE_FLAGS = ("maxk", "density_k", "z", "subject_fraction", "answer_fraction")  # `actstore analyze` sets these


@dataclasses.dataclass(frozen=True)
class Settings:
    """What analyses ran with: the parameters and the sample mask. Stored results are kept per settings, so
    plot looks them up by these, and the report states them (figures and summary are read without them)."""

    params: DensityParams = PAPER
    mask: Mask = Mask()
    compare_k: int = OVERLAP_K
    given: frozenset[str] = frozenset()  # the parameters asked for by name, never fitted to small runs

    def fitted_to(self, samples: int) -> Settings:
        """These settings as a server fits them to runs of ``samples`` samples (``analysis.params.fitted``,
        the data overlap's k too): what ``actstore analyze`` computed when asked with the same flags, so that
        the analyses of runs of 100 samples or fewer are found as well."""
        params = fitted(self.params, self.given, samples)
        return dataclasses.replace(self, params=params, compare_k=compare_k_for(samples))

    @property
    def changes(self) -> dict[str, Any]:
        """The parameters that differ from the paper preset's, by name."""
        return {
            f.name: getattr(self.params, f.name)
            for f in dataclasses.fields(DensityParams)
            if getattr(self.params, f.name) != getattr(PAPER, f.name)
        }

    def name(self) -> str:
        """In a few words, e.g. "preset paper with z 2.1, first 20 per subject"."""
        samples = "every sample" if self.mask.per_subject is None else f"first {self.mask.per_subject} per subject"
        return f"preset paper{f' with {self._changed()}' if self.changes else ''}, {samples}"

    def flags(self) -> list[str] | None:
        """The flags that ask ``actstore analyze`` (and ``actstore plot``) for these settings; None when a
        parameter differs that only the Python client sets (gride_range_max, id_scale_index)."""
        if not set(self.changes) <= set(ANALYZE_FLAGS):
            return None
        per_subject = [] if self.mask.per_subject is None else ["--per-subject", str(self.mask.per_subject)]
        return per_subject + [
            item for name, value in self.changes.items() for item in (f"--{name.replace('_', '-')}", f"{value:g}")
        ]

    def samples(self) -> str:
        if self.mask.per_subject is None:
            return "every stored sample analysed"
        return f"the first {self.mask.per_subject} samples of each subject analysed"

    def values(self) -> str:
        """The parameters the figures' metrics depend on, as the summary and the figures name them."""
        p = self.params
        return (
            f"Gride ID at scale {2 ** (p.id_scale_index + 1)}, kNN density k = {p.density_k}, ADP Z = {p.z:g}, "
            f"label overlap class fractions {p.subject_fraction:g} (subjects) and {p.answer_fraction:g} "
            f"(answers), data overlap k = {self.compare_k}"
        )

    def parameters(self) -> str:
        if not self.changes:
            return f"the study's parameters (`paper`: {self.values()})"
        return f"the `paper` preset with {self._changed()} ({self.values()})"

    def _changed(self) -> str:
        return ", ".join(f"{name} {value:g}" for name, value in self.changes.items())


STUDY = Settings()  # what `actstore study` analyses: the paper preset over every sample (study.job)


def method_table(results: xr.Dataset, model: str) -> xr.Dataset:
    """The job's table with runs named by method and pairs by their methods ("0shot vs 5shot")."""
    prefix = f"{model}/"
    table = results.assign_coords(run=[str(r).removeprefix(prefix) for r in results.run.values]).rename(run="method")
    if "pair" in table.dims:
        table = table.assign_coords(pair=[str(p).replace(prefix, "") for p in table.pair.values])
    return table


def reference_method(methods: list[str]) -> str:
    """The method with the most in-context examples (the study's transition is clearest with 5 shots)."""
    shots = {m: int(found.group(1)) for m in methods if (found := re.fullmatch(r"(\d+)shot", m))}
    return max(shots, key=shots.get) if shots else methods[-1]


def transition(ari_subject: xr.DataArray) -> dict[str, Any]:
    """Where the subject ARI crosses half its peak: ``fall``, the first layer after the peak below half
    (the study's picture: subjects organise the early layers, then give way), and ``rise``, the first
    layer at or above half. The transition ``layer`` is the fall, or the rise when the ARI never falls;
    None when the peak is under MIN_SUBJECT_ARI."""
    peak = int(np.argmax(ari_subject.fillna(-np.inf).values))
    values, layers = ari_subject.values, ari_subject.layer.values
    found = {"peak_layer": int(layers[peak]), "peak": float(values[peak]), "rise": None, "fall": None, "layer": None}
    if found["peak"] >= MIN_SUBJECT_ARI:
        half = found["peak"] / 2
        found["rise"] = int(layers[np.nonzero(values >= half)[0][0]])
        after = np.nonzero(values[peak:] < half)[0]
        found["fall"] = int(layers[peak + after[0]]) if after.size else None
        found["layer"] = found["fall"] if found["fall"] is not None else found["rise"]
    return found


def training_table(table: xr.Dataset, training: dict[str, dict]) -> xr.Dataset | None:
    """The fine-tuned runs (and 0-shot as step 0: the same prompt before training) over a ``step`` dimension,
    ordered by step; None without checkpoints to put in order."""
    steps = {m: info["step"] for m, info in training.items() if m in table.method}
    if "0shot" in table.method:
        steps["0shot"] = 0
    if len(steps) < 3:
        return None
    order = sorted(steps, key=steps.get)
    return table.sel({"method": order}).assign_coords(method=[steps[m] for m in order]).rename(method="step")


def write_results(
    out: Path,
    model: str,
    results: xr.Dataset,
    accuracy: dict[str, float | None],
    n_samples: dict[str, int],
    dendrograms: Dendrograms,
    training: dict[str, dict] | None = None,
    *,
    settings: Settings = STUDY,
    fmt: str = "png",
) -> list[Path]:
    """Write layers.csv, comparison.csv, the layers figure, a dendrogram of an early layer, and summary.md;
    with fine-tuned runs (``training``: each one's fine-tuning provenance), the training figure across their
    steps. Figures in ``fmt`` (figures.FORMATS); ``settings``: what ``results`` were analysed with."""
    if fmt not in figures.FORMATS:
        raise ValueError(f"figure format {fmt!r}: expected one of {', '.join(figures.FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    training = training or {}
    table = method_table(results, model)
    methods = [str(m) for m in table.method.values]
    written = [out / "layers.csv"]
    table[[v for v in table.data_vars if "method" in table[v].dims]].to_dataframe().to_csv(written[0])
    if "pair" in table.dims:
        written.append(out / "comparison.csv")
        table[[v for v in table.data_vars if "pair" in table[v].dims]].to_dataframe().to_csv(written[-1])
    n_layers = int(table.layer.max()) + 1
    arms = [m for m in methods if "-step" not in m]  # checkpoints are drawn in the training figure
    written.append(
        figures.save(
            figures.draw_layers(
                table.sel({"method": arms}),
                f"{model} on MMLU: {_sizes(n_samples)}, {settings.name()}\n{settings.values()}",
            ),
            out / f"layers.{fmt}",
        )
    )
    steps = training_table(table, training)
    if steps is not None:
        written.append(
            figures.save(
                figures.draw_training(
                    steps, f"{model}: the representation across fine-tuning steps (0: before), {settings.name()}"
                ),
                out / f"training.{fmt}",
            )
        )
    reference = reference_method(methods)
    found = transition(table.ari_subject.sel({"method": reference}))
    tree_layer, tree = _early_dendrogram(table, model, reference, n_layers, dendrograms)
    if tree is not None:
        written.append(
            figures.save(
                figures.draw_dendrogram(
                    tree,
                    f"{model}, {reference}, layer {tree_layer}:\n"
                    "density peaks of clusters over 30 points, by majority subject",
                    reference,
                ),
                out / f"dendrogram-{reference}-layer{tree_layer}.{fmt}",
            )
        )
    summary = out / "summary.md"
    finetuning = (
        _finetuning(table, accuracy, training, n_layers, n_samples.get("finetuned") or 1)
        if "finetuned" in training
        else []
    )
    summary.write_text(
        _summary(
            model, table, accuracy, n_samples, reference, found, tree_layer, written, n_layers, finetuning, settings
        )
    )
    return [*written, summary]


def _early_dendrogram(
    table: xr.Dataset, model: str, method: str, n_layers: int, dendrograms: Dendrograms
) -> tuple[int | None, dict[str, Any] | None]:
    """The first-half layer of ``method`` with the highest subject ARI that has a dendrogram to draw."""
    ari = table.ari_subject.sel({"method": method})
    early = ari.where(ari.layer < n_layers / 2, drop=True)
    for layer in early.layer.values[np.argsort(-early.fillna(-np.inf).values, kind="stable")]:
        try:
            tree = dendrograms(f"{model}/{method}", int(layer))
        except KeyError:  # the layer failed
            continue
        if tree is not None:
            return int(layer), tree
    return None, None


def _sizes(n_samples: dict[str, int]) -> str:
    counts = sorted(set(n_samples.values()))
    return f"{counts[0]} questions" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} questions"


def _at(values: xr.DataArray, pick: Callable) -> str:
    if values.isnull().all():
        return "-"
    index = int(pick(values.fillna(-np.inf if pick is np.argmax else np.inf).values))
    return f"{float(values[index]):.3f} (layer {int(values.layer[index])})"


def _summary(
    model: str,
    table: xr.Dataset,
    accuracy: dict[str, float | None],
    n_samples: dict[str, int],
    reference: str,
    found: dict[str, Any],
    tree_layer: int | None,
    written: list[Path],
    n_layers: int,
    finetuning: list[str],
    settings: Settings,
) -> str:
    half = n_layers / 2
    lines = [
        f"# {model} on MMLU, layer by layer",
        "",
        f"{_sizes(n_samples)} per method, {settings.samples()}; layers 1-{n_layers - 1} of {n_layers} (0 is "
        f"the embedding); {settings.parameters()}.",
        "",
        "| method | questions | accuracy | ID peak | subject ARI max | answer ARI max | predicted-letter ARI max "
        "| answer overlap max | clusters, first half / second half |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in table.method.values:
        row = table.sel({"method": method})
        clusters = [float(row.n_clusters.where(cond).mean()) for cond in (row.layer < half, row.layer >= half)]
        acc = accuracy.get(str(method))
        lines.append(
            f"| {method} | {n_samples.get(str(method), '-')} | {'-' if acc is None else f'{acc:.3f}'} "
            f"| {_at(row.id, np.argmax)} | {_at(row.ari_subject, np.argmax)} | "
            f"{_at(row.ari_answer, np.argmax)} | {_at(row.ari_prediction, np.argmax)} | "
            f"{_at(row.overlap_answer, np.argmax)} | "
            f"{clusters[0]:.1f} / {clusters[1]:.1f} |"
        )
    lines += ["", "## Transition layer", ""]
    if found["layer"] is None:
        lines.append(
            f"No transition layer: the subject ARI of {reference} peaks at {found['peak']:.3f} (layer "
            f"{found['peak_layer']}), below {MIN_SUBJECT_ARI}: no subject clustering to place."
        )
    elif found["fall"] is not None:
        lines.append(
            f"The subject ARI of {reference} rises above half its peak at layer {found['rise']}, peaks at "
            f"{found['peak']:.3f} at layer {found['peak_layer']} and first falls below half of it at "
            f"**layer {found['fall']}** of {n_layers}: the transition layer, where subject clusters give "
            "way (the study places Llama-3-8B's near mid-depth, the subject ARI falling by layers 14-17 "
            "of 32)."
        )
    else:
        lines.append(
            f"The subject ARI of {reference} never falls back: it first reaches half its peak at **layer "
            f"{found['rise']}** of {n_layers} and peaks at {found['peak']:.3f} at layer "
            f"{found['peak_layer']}. The transition layer here is that rise, where subject clusters "
            "form; in the study (Llama-3-8B) they form in the first layers and give way near mid-depth."
        )
    for pair in table.pair.values if "pair" in table.dims else []:
        overlap = table.data_overlap.sel(pair=pair)
        lines.append(f"\nData overlap {pair}: lowest {_at(overlap, np.argmin)}, highest {_at(overlap, np.argmax)}.")
    errors = [
        f"{r}/{int(layer)}: {e}"
        for r in table.method.values
        for layer, e in zip(table.layer.values, table.error.sel({"method": r}).values)
        if e
    ]
    if errors:
        lines += ["", "Layers that failed: " + "; ".join(errors)]
    lines += finetuning
    lines += ["", "## Files", ""] + [f"- `{p.name}`" for p in written]
    if tree_layer is None:
        lines.append("- no dendrogram: no early layer has two clusters of more than 30 points at this size")
    return "\n".join(lines) + "\n"


# The study's figures for the fine-tuned arm (docs/explanation/science.md), beside which ours are put.
STUDY_FINETUNED = (
    "Llama-3-8B (the study): answer ARI of few-shot runs ~0 up to layer 17 and <= 0.12 after, the "
    "fine-tuned model's jumping to ~0.17-0.19 from layer 17 of 32; answer label overlap after layer 16 "
    "~0.45 fine-tuned vs ~0.38 5-shot (Llama-2-13B)"
)
COMPARED = ("ari_subject", "ari_answer", "ari_prediction", "overlap_answer")


def _finetuning(
    table: xr.Dataset, accuracy: dict[str, float | None], training: dict[str, dict], n_layers: int, n_probed: int
) -> list[str]:
    """What the fine-tuned arm shows: its recipe, accuracy before and after (probed and held out) against the
    most-shot run's, whether the answer structure the study saw appears, and where fine-tuned and the
    most-shot run differ."""
    final = training["finetuned"]
    recipe, held = final["recipe"], final["accuracy"]
    other = reference_method([m for m in map(str, table.method.values) if not m.startswith("finetuned")])
    steps = final.get("checkpoints", {}).get("steps", [])
    lines = [
        "",
        "## Fine-tuning",
        "",
        f"LoRA with the authors' recipe on {final['training']['n_questions']} training questions from "
        f"{len(recipe['subjects'])} subjects (held out of every method's questions), {final['step']} steps"
        f"{' (stopped at the asked accuracy)' if final.get('stopped_early') else ''}, checkpoints at steps "
        f"{', '.join(map(str, steps)) or 'none'}, every one probed; final training loss {final['final_loss']:.4f}. "
        f"Training prompt: {recipe['prompt_format']}. Clipping: {recipe['clipping']}. Schedule: "
        f"{recipe['schedule']}. Weighting: {recipe['weighting']}.",
        "",
        "| | before (0-shot) | after (finetuned) |",
        "| --- | ---: | ---: |",
        f"| accuracy on the probed questions | {_number(accuracy.get('0shot'))} | "
        f"{_number(accuracy.get('finetuned'))} |",
        f"| accuracy on {held['n_held_out']} held-out questions (neither trained on nor probed) | "
        f"{_number(held['before'])} | {_number(held['after'])} |",
    ]
    checkpoints = sorted((info["step"], m) for m, info in training.items() if m != "finetuned")
    if checkpoints:
        lines += [
            "",
            "Probed accuracy across training: "
            + ", ".join(f"step {step} {_number(accuracy.get(m))}" for step, m in checkpoints)
            + f", step {final['step']} {_number(accuracy.get('finetuned'))}.",
        ]
    lines += [
        "",
        "Held-out accuracy at every checkpoint: "
        + ", ".join(f"step {step} {_number(value)}" for step, value in held["held_out"])
        + ".",
    ]
    lines += ["", _verdict(table, accuracy, held, other, n_layers, n_probed)]
    if other in table.method:
        half = n_layers / 2
        lines += [
            "",
            f"Where finetuned and {other} differ (mean over the first half / second half of the layers; "
            "the largest difference and its layer):",
            "",
            f"| metric | finetuned | {other} | largest difference |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name in COMPARED:
            tuned, shots = (table[name].sel({"method": m}) for m in ("finetuned", other))
            gap = (tuned - shots).fillna(0)
            at = int(np.argmax(np.abs(gap.values)))
            lines.append(
                f"| {name} | {_halves(tuned, half)} | {_halves(shots, half)} | "
                f"{float(gap[at]):+.3f} (layer {int(gap.layer[at])}) |"
            )
    return lines + ["", f"For comparison, {STUDY_FINETUNED}."]


CHANCE = 0.25  # four options
ANSWER_STRUCTURE = 0.05  # answer ARI of the second half's layers below this: no answer clustering to speak of


def _verdict(
    table: xr.Dataset, accuracy: dict[str, float | None], held: dict[str, Any], other: str, n_layers: int, n_probed: int
) -> str:
    """In plain words: did fine-tuning reach the most-shot run's accuracy, and does the study's late-layer answer
    structure appear; where it does not and the model answers at chance, that is why."""
    tuned, shots = accuracy.get("finetuned"), accuracy.get(other)
    best_held = max((v for _, v in held["held_out"] if v is not None), default=None)
    if tuned is None or shots is None:
        reached = "No accuracy to compare with the most-shot run."
    elif tuned >= shots:
        reached = f"The fine-tuned model reached {other} accuracy on the probed questions ({tuned:.3f} vs {shots:.3f})."
    else:
        reached = (
            f"The fine-tuned model did not reach {other} accuracy on the probed questions ({tuned:.3f} vs "
            f"{shots:.3f}; held-out accuracy at best {_number(best_held)})."
        )
    late = table.ari_answer.sel({"method": "finetuned"}).where(table.layer >= n_layers / 2)
    late_max = float(late.max()) if not late.isnull().all() else float("nan")
    at_chance = tuned is not None and abs(tuned - CHANCE) <= _chance_band(n_probed)
    if late_max >= ANSWER_STRUCTURE:
        structure = (
            f"The answer structure appears: the fine-tuned run's answer ARI reaches {late_max:.3f} in the "
            "second half of the layers (the study: ~0.17-0.19 from layer 17 of 32)."
        )
    elif at_chance:
        structure = (
            f"The study's late-layer answer structure does not appear (answer ARI at most {late_max:.3f} in "
            f"the second half of the layers, against ~0.17-0.19 in the study), and this is no reproduction "
            f"of it: the model answers at chance ({tuned:.3f}, chance {CHANCE}), so there is no right answer "
            "in its representation for the late layers to organise by."
        )
    else:
        structure = (
            f"The study's late-layer answer structure does not appear (answer ARI at most {late_max:.3f} in "
            "the second half of the layers, against ~0.17-0.19 in the study), although the model answers "
            "above chance."
        )
    return f"{reached} {structure}"


def _chance_band(n_probed: int) -> float:
    """Two binomial standard errors of an accuracy at chance over ``n_probed`` questions (0.043 for 400)."""
    return 2 * float(np.sqrt(CHANCE * (1 - CHANCE) / n_probed))


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _halves(values: xr.DataArray, half: float) -> str:
    return " / ".join(f"{float(values.where(cond).mean()):.3f}" for cond in (values.layer < half, values.layer >= half))
