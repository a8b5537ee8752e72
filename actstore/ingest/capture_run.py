"""The capture ingest: any text dataset (or the study's prompts), any sites, any token positions, one capture
run per method.

What TransformerLens' ``run_with_cache`` or SAELens' activation caches give, kept the actstore way: every
requested site of every text in one forward pass per batch, committed atomically, resumable after a kill
(texts are stored in one fixed order and committed in whole batches, so a rerun continues with the very
batches an uninterrupted run would have computed), checksummed, in a folder or a bucket.

Everything a bad request can get wrong (a column, a template, a site, a position beyond a text, a mix of
sites) is checked before the run is touched, so a refused ingest writes nothing.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from actstore.ingest.capture import (
    Capture,
    Captured,
    Positions,
    Site,
    check_positions,
    parse_positions,
    resolve_sites,
)
from actstore.ingest.datasets import LETTERS, PACKAGED_MMLU, DatasetError, packaged_mmlu_path
from actstore.ingest.extract import letter_token_ids
from actstore.ingest.methods import Method, parse_method
from actstore.ingest.model import LoadedModel, ModelSource, load_model
from actstore.ingest.options import IngestOptions
from actstore.ingest.pipeline import DEFAULT_BATCH_SIZE, Ingest, Target, now, versions
from actstore.ingest.prompts import build_prompt
from actstore.ingest.selection import storage_order
from actstore.ingest.texts import Text, TextDataset, label_arrays, load_texts
from actstore.store.capture import CaptureLayout, IncompatibleSites
from actstore.store.layout import compressed_nbytes

log = logging.getLogger(__name__)

DEFAULT_SITES = ["resid_post"]
NO_ROOM = (
    "capture fewer texts (--limit), sites or positions, store 16-bit states (--store-dtype float16), use another "
    "--store, or write anyway with --no-space-check (a full disk then stops the ingest, every committed text kept)"
)
METHOD = "0shot"  # a text is captured as given: no shots, no fine-tuning


@dataclass
class CaptureReport:
    run: str
    added: int  # texts
    rows: int  # rows added (tokens, or one per text)
    texts: int  # texts stored in all
    size_bytes: int
    seconds: float


@dataclass
class Job:
    """One capture run: its method, the model it probes, its texts in storage order and their labels."""

    method: str
    source: ModelSource
    texts: list[Text]
    labels: dict[str, np.ndarray]  # per label column, a value per entry of ``rows``
    rows: dict[int, int]  # a text's id -> its entry in ``labels``
    recipe: dict
    dataset: str
    answers: bool = False  # the study's questions at their last token: letter logits, prediction, correct

    def pending(self, committed: np.ndarray) -> list[Text]:
        stored = set(np.asarray(committed).tolist())
        return [t for t in self.texts if t.id not in stored]


class CaptureIngest:
    """One capture: the texts read and checked (a text dataset, or the study's prompts of each method), then
    per run the model loaded, the sites resolved, the positions checked, the rows committed."""

    def __init__(self, opts: IngestOptions) -> None:
        self.opts = opts
        _check_options(opts)
        self.positions: Positions = parse_positions(opts.positions)
        # the study's questions: each method's prompts captured as texts
        self.questions = None if opts.text_column or opts.template else Ingest(opts)
        target = Target.of(opts) if self.questions is None else self.questions
        self.store, self.base, self.name = target.store, target.base, target.name
        self.device, self.dtype = target.device, target.dtype
        if self.questions is None:
            self.jobs = [self._text_job()]
        else:
            self.jobs = [self._question_job(method) for method in self.questions.methods]
        self.store_dtype = _store_dtype(opts.store_dtype, self.dtype)
        self._loaded: dict[ModelSource, LoadedModel] = {}

    def _text_job(self) -> Job:
        opts = self.opts
        spec = packaged_mmlu_path() if opts.dataset == PACKAGED_MMLU else opts.dataset
        dataset: TextDataset = load_texts(spec, opts.text_column, opts.label_columns, opts.template)
        # typed over the whole dataset (a batch alone could take a float column of whole numbers for ints)
        labels = label_arrays(dataset.texts, dataset.label_columns)
        recipe = {
            "model_id": self.base.model_id,
            "model_fingerprint": self.base.fingerprint(),
            "method": METHOD,
            "dataset": {"name": dataset.name, "sha256": dataset.sha256},
            "text": {"column": opts.text_column} if opts.template is None else {"template": opts.template},
            "label_columns": list(opts.label_columns),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
        }
        return Job(
            METHOD,
            self.base,
            _storage_order(dataset.texts[: opts.limit]),
            labels,
            {t.id: i for i, t in enumerate(dataset.texts)},
            {**recipe, **self._capture_recipe()},
            dataset.name,
        )

    def _question_job(self, method: Method) -> Job:
        """A method's prompts, as the study builds them (shots included), with subject and answer as labels."""
        questions, opts = self.questions, self.opts
        questions.check_shots(method)
        source = questions.source_of(method)
        shots = {s: questions.selection.shots(s, method.k) for s in questions.selection.shot_pool}
        texts = [
            Text(q.id, build_prompt(q, shots[q.subject], opts.shot_seed), {"subject": q.subject, "answer": q.answer})
            for q in storage_order(questions.selection.queries)
        ]
        recipe = {k: v for k, v in questions.recipe_of(method, source).items() if k not in ("site", "token_position")}
        return Job(
            method.name,
            source,
            texts,
            label_arrays(texts, ["subject", "answer"]),
            {t.id: i for i, t in enumerate(texts)},
            {**recipe, **self._capture_recipe()},
            questions.dataset.name,
            answers=self.positions.mode == "last",
        )

    def _capture_recipe(self) -> dict:
        opts = self.opts
        return {
            "sites": list(opts.sites or DEFAULT_SITES),
            "positions": opts.positions,
            "max_tokens": opts.max_tokens,
            "top_logits": opts.top_logits,
            "store_dtype": _store_dtype(opts.store_dtype, self.dtype),
        }

    def key(self, job: Job) -> str:
        return f"{self.name}/{job.method}"

    def model(self, source: ModelSource) -> LoadedModel:
        if self.questions is not None:
            return self.questions.model(source)  # an adapter attached to the base, as the study probes it
        if source not in self._loaded:
            self._loaded[source] = load_model(source, self.device, self.dtype)
        return self._loaded[source]

    def capture(self, job: Job) -> tuple[Capture, list[Site]]:
        """The capture of the asked sites; refuses sites that cannot share a run (IncompatibleSites)."""
        loaded = self.model(job.source)
        sites = resolve_sites(loaded.model, self.opts.sites or DEFAULT_SITES)
        counts = {site.name: site.n_layers for site in sites}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{name} {n}" for name, n in counts.items())
            raise IncompatibleSites(
                f"sites with different numbers of layers cannot share a run ({listed}); ingest them under "
                "different --name"
            )
        letters = tuple(letter_token_ids(loaded.tokenizer)) if job.answers else ()
        return Capture(loaded, sites, self.positions, self.opts.top_logits, self.opts.max_tokens, letters), sites

    def committed(self, job: Job) -> np.ndarray:
        """The ids already stored in the job's run (none when it is new or to be overwritten); a run of another
        recipe is refused here, before any model loads."""
        if not self.store.has_run(self.name, job.method) or self.opts.overwrite:
            return np.zeros(0, np.int64)
        run = self.store.run(self.name, job.method)
        run.check_recipe(job.recipe)
        return run.committed_samples()

    def check_positions(self, capture: Capture, texts: list[Text]) -> list[int]:
        """Each text's length in tokens; a position beyond a text is refused naming the text's id."""
        lengths = [len(ids) for ids in capture.tokenize([t.text for t in texts])]
        try:
            check_positions(self.positions, lengths, [f"the text of row {t.id} of the dataset" for t in texts])
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
        return lengths

    def layout(self, job: Job, sites: list[Site], probe: Captured) -> CaptureLayout:
        """The run's arrays: one per site, its width seen on ``probe``, one text captured (a module pattern's
        width is known only from its output)."""
        return CaptureLayout(
            rows="sample" if self.positions.per_text == 1 else "token",
            n_layers=sites[0].n_layers,
            hidden=self.model(job.source).hidden_size,
            sites={site.name: probe.states[site.name].shape[2] for site in sites},
            store_dtype=self.store_dtype,
            labels={name: _label_dtype(values) for name, values in job.labels.items()}
            | ({"prediction": "str", "correct": "bool"} if job.answers else {}),
            top_k=self.opts.top_logits,
            letters=LETTERS if job.answers else (),
        )

    def run(self, job: Job, say: Callable[[str], None]) -> CaptureReport | None:
        """Capture every text the job's run still lacks, committing as it goes; resumable at any kill."""
        opts, key = self.opts, self.key(job)
        pending = job.pending(self.committed(job))
        if not pending:
            say(f"{key}: up to date, nothing to do")
            return None
        capture, sites = self.capture(job)
        lengths = self.check_positions(capture, pending)
        probe = capture([pending[0].text], dtype=self.store_dtype)
        layout = self.layout(job, sites, probe)
        if opts.space_check:
            nbytes = int(_row_bytes(probe, self.store_dtype, job) * _n_rows(self.positions, lengths))
            replacing = [(self.name, job.method)] if opts.overwrite else []
            self.store.check_room(nbytes, f"{key}'s capture", NO_ROOM, replacing)
        with self.store.begin_run(
            self.name, job.method, recipe=job.recipe, overwrite=opts.overwrite, commit_seconds=opts.commit_seconds
        ) as writer:
            pending = job.pending(writer.committed_ids())  # again, under the lock
            batch_size = opts.batch_size or writer.stored_attrs.get("batch_size") or DEFAULT_BATCH_SIZE
            writer.start(
                provenance=self._provenance(job, sites),
                capture=layout,
                attrs={"batch_size": batch_size},
                planned=len(writer.committed_ids()) + len(pending),
                history=self._history_entry(job, len(pending), batch_size),
            )
            started, rows = time.perf_counter(), 0
            with tqdm(total=len(pending), unit="text", desc=key, mininterval=1.0) as bar:
                for first in range(0, len(pending), batch_size):
                    batch = pending[first : first + batch_size]
                    captured = capture([t.text for t in batch], dtype=self.store_dtype)
                    writer.add(captured.states, self._rows(job, batch, captured))
                    rows += len(captured.text)
                    bar.update(len(batch))
        run = self.store.run(self.name, job.method)
        return CaptureReport(key, len(pending), rows, run.n_texts, run.size_bytes(), time.perf_counter() - started)

    def _rows(self, job: Job, batch: list[Text], captured: Captured) -> dict[str, np.ndarray]:
        """The row arrays of one batch: each row's sample id, position, token id, labels, top logits."""
        entries = np.array([job.rows[t.id] for t in batch], dtype=np.int64)[captured.text]
        ids = np.array([t.id for t in batch], dtype=np.int64)[captured.text]
        rows = {"sample": ids, "position": captured.position, "token_id": captured.token_id}
        rows.update({name: values[entries] for name, values in job.labels.items()})
        if self.opts.top_logits:
            rows.update(top_ids=captured.top_ids, top_logits=captured.top_logits)
        if job.answers:  # the model's answer, as the study reads it: the letter of the largest logit
            predictions = np.asarray(LETTERS, dtype=object)[captured.logits.argmax(axis=1)]
            rows.update(
                letter_logits=captured.logits, prediction=predictions, correct=predictions == rows["answer"].astype(str)
            )
        return rows

    def _provenance(self, job: Job, sites: list[Site]) -> dict:
        loaded = self.model(job.source)
        tok = loaded.tokenizer
        return {
            "model_id": self.base.model_id,
            "model_location": self.base.location,
            "model_name": self.name,
            "checkpoint_location": job.source.location if job.source != self.base else None,
            "revision": getattr(loaded.model.config, "_commit_hash", None),
            "architecture": type(loaded.model).__name__,
            "tokenizer": {
                "name_or_path": tok.name_or_path,
                "class": type(tok).__name__,
                "vocab_size": len(tok),
                "bos_token": tok.bos_token,
                "special_tokens": "as the tokenizer adds them by default",
            },
            "sites": {site.name: {"modules": list(site.modules), "hook": site.hook} for site in sites},
            "positions": self.opts.positions,
            "dataset": {"location": str(self.opts.dataset), "name": job.dataset},
            "sample_order": "by text length in characters, then id (questions: by subject, then length); "
            "appended ingests follow",
            "device": str(loaded.device),
            "created": now(),
            "access": self.opts.access(),
        }

    def _history_entry(self, job: Job, n_added: int, batch_size: int) -> dict:
        return {
            "time": now(),
            "selection": f"{n_added} texts of {job.dataset}",
            "added": n_added,
            "batch_size": batch_size,
            "versions": versions(),
            "python": platform.python_version(),
        }


def capture_all(opts: IngestOptions, say: Callable[[str], None] = log.info) -> str:
    """The capture ``opts`` asks for, one line per run told to ``say``; returns the model's store name."""
    ingest = CaptureIngest(opts)
    with ingest.store.writing():
        for job in ingest.jobs:
            report = ingest.run(job, say)
            if report is not None:
                say(
                    f"{report.run}: +{report.added} texts, {report.rows:,} rows ({report.texts} texts stored), "
                    f"{report.size_bytes / 1e6:.1f} MB on disk, {report.seconds:.1f} s "
                    f"({report.rows / max(report.seconds, 1e-9):,.0f} rows/s)"
                )
    return ingest.name


def estimate_capture(ingest: CaptureIngest, job: Job) -> dict:
    """What ``--dry-run`` prints for a capture run: texts, tokens, rows, time and bytes, from one timed batch."""
    texts = job.pending(ingest.committed(job))
    result = {"run": ingest.key(job), "texts": len(texts), "tokens": 0, "rows": 0, "seconds": 0.0, "bytes": 0}
    if not texts:
        return result
    capture, _ = ingest.capture(job)
    lengths = ingest.check_positions(capture, texts)
    rows = _n_rows(ingest.positions, lengths)
    batch_size = ingest.opts.batch_size or DEFAULT_BATCH_SIZE
    middle = len(texts) // 2
    sample = texts[middle : middle + batch_size]
    capture([sample[0].text], dtype=ingest.store_dtype)  # warm-up
    started = time.perf_counter()
    captured = capture([t.text for t in sample], dtype=ingest.store_dtype)
    seconds = time.perf_counter() - started
    result.update(
        tokens=int(sum(lengths)),
        rows=int(rows),
        seconds=seconds
        / (len(sample) * max(lengths[middle : middle + batch_size]))
        * _padded_tokens(lengths, batch_size),
        bytes=int(_row_bytes(captured, ingest.store_dtype, job) * rows),
    )
    return result


def _n_rows(positions: Positions, lengths: list[int]) -> int:
    """The rows texts of ``lengths`` tokens give at ``positions``."""
    return sum(lengths) if positions.per_text is None else positions.per_text * len(lengths)


def _row_bytes(captured: Captured, store_dtype: str, job: Job) -> float:
    """A row's bytes on disk, as ``captured``'s compress: its states at every site, its coordinates, labels."""
    stored = sum(compressed_nbytes(states, store_dtype) for states in captured.states.values())
    return stored / max(len(captured.text), 1) + 8 * (3 + len(job.labels))


def _padded_tokens(lengths: list[int], batch_size: int) -> int:
    return sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )


def _check_options(opts: IngestOptions) -> None:
    """Options that a capture does not take, refused in one line."""
    if opts.top_logits and opts.positions.strip() == "mean":
        raise DatasetError("--top-logits are taken at token positions; --positions mean has none")
    if not (opts.text_column or opts.template):
        if opts.label_columns:
            raise DatasetError(
                "--label-columns name a text dataset's columns (with --text-column); questions are stored "
                "with their subject and answer"
            )
        return
    methods = [parse_method(m).name for m in opts.methods]
    if methods != [METHOD]:
        raise DatasetError(
            f"a text dataset is captured as given (method {METHOD}); methods {', '.join(methods)} need the "
            "study's multiple-choice questions"
        )
    if opts.subjects or opts.per_subject:
        raise DatasetError(
            "--subjects and --per-subject select multiple-choice questions; a text dataset takes --limit"
        )


def _storage_order(texts: list[Text]) -> list[Text]:
    """Shortest first, so batches pad little; a fixed order makes a resumed run's batches an uninterrupted
    run's."""
    return sorted(texts, key=lambda t: (len(t.text), t.id))


def _store_dtype(asked: str, compute: torch.dtype) -> str:
    """``auto``: the compute dtype's own, so that nothing is rounded away (bf16 and fp16 are stored exactly)."""
    return str(compute).removeprefix("torch.") if asked == "auto" else asked


def _label_dtype(values: np.ndarray) -> str:
    if values.dtype == object or values.dtype.kind in "US":
        return "str"
    return {"b": "bool", "i": "int64", "u": "int64", "f": "float64"}[values.dtype.kind]
