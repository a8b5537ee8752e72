"""The ingest job: plan which questions each run still needs, run the model on them, commit to the store."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from actstore.adapter import AdapterError, finished_adapter, read_record, saved_steps
from actstore.ingest.datasets import Dataset, DatasetError, Question, load_dataset
from actstore.ingest.extract import StateExtractor
from actstore.ingest.methods import Method, parse_method
from actstore.ingest.model import LoadedModel, ModelSource, attach_adapter, load_model, resolve_device, resolve_dtype
from actstore.ingest.options import IngestOptions
from actstore.ingest.prompts import PROMPT_FORMAT, build_prompt
from actstore.ingest.selection import Selection, select, storage_order, train_source
from actstore.store import Store, safe_name, validate_name
from actstore.store.layout import compressed_nbytes

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
NO_ROOM = (
    "ingest fewer questions (--limit, --per-subject, --subjects) or methods, use another --store, or write anyway "
    "with --no-space-check (a full disk then stops the ingest, every committed question kept)"
)
_VERSIONED = ("actstore", "torch", "transformers", "tokenizers", "zarr", "numcodecs", "numpy", "gguf", "peft")


@dataclass
class RunReport:
    model: str
    method: str
    added: int
    samples: int
    accuracy: float | None
    size_bytes: int
    seconds: float  # the ingest itself: questions/s is added / seconds
    load_seconds: float  # loading the model (0 when an earlier method of the same ingest loaded it)


@dataclass
class Plan:
    """One run's work: its store name, recipe and the questions it still lacks, in storage order."""

    method: Method
    source: ModelSource
    recipe: dict
    pending: list[Question]


@dataclass
class Target:
    """Where an ingest writes and what it runs: the store, the base model and its name there, the device and
    compute dtype; every name checked before anything loads."""

    store: Store
    base: ModelSource
    name: str
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, opts: IngestOptions) -> Target:
        store = Store(opts.store)  # first: a store URL of an unknown scheme is refused before any loading
        base = ModelSource.resolve(opts.model, opts.gguf_file)
        name = validate_name(opts.name, "model name") if opts.name else safe_name(base.default_name)
        for group in filter(None, [opts.group, *opts.shared_with]):
            validate_name(group, "group name")
        device = resolve_device(opts.device)
        return cls(store, base, name, device, resolve_dtype(opts.dtype, device))


class Ingest:
    """Holds what every method of one ingest shares: dataset, selection, store, loaded models."""

    def __init__(self, opts: IngestOptions) -> None:
        self.opts = opts
        target = Target.of(opts)
        self.store, self.base, self.name = target.store, target.base, target.name
        self.device, self.dtype = target.device, target.dtype
        self.methods = [parse_method(m) for m in opts.methods]
        if any(m.finetuned for m in self.methods) and not opts.checkpoint:
            raise ValueError("method 'finetuned' needs --checkpoint (the fine-tuned model; --model names its base)")
        self.dataset: Dataset = load_dataset(opts.dataset)
        self.selection: Selection = select(self.dataset, opts.subjects, opts.per_subject, opts.limit, opts.train_pool)
        self._fingerprints: dict[ModelSource, str] = {}
        self._loaded: dict[ModelSource, LoadedModel] = {}

    # -- planning -------------------------------------------------------------------------------

    def plans(self) -> Iterator[Plan]:
        for method in self.methods:
            self.check_shots(method)
            source = self.source_of(method)
            recipe = self.recipe_of(method, source)
            yield Plan(method, source, recipe, self._pending(method, recipe))

    def check_shots(self, method: Method) -> None:
        subjects = {q.subject for q in self.selection.queries}
        short = sorted(s for s in subjects if len(self.selection.shot_pool.get(s, [])) < method.k)
        if short:
            raise DatasetError(
                f"method {method.name} needs {method.k} shots but the shot pool of {', '.join(short[:5])} holds fewer"
            )

    def source_of(self, method: Method) -> ModelSource:
        """The base model, or for a fine-tuned method the checkpoint it probes, checked before any loading:
        an adapter must be finished, trained on this base, and never on the questions probed."""
        if not method.finetuned:
            return self.base
        checkpoint = Path(method.checkpoint_folder(self.opts.checkpoint))
        if method.step is not None and not checkpoint.is_dir():
            saved = saved_steps(checkpoint.parent)
            raise AdapterError(
                f"method {method.name}: no checkpoint-{method.step} in {checkpoint.parent} (saved "
                f"steps: {', '.join(map(str, saved)) or 'none'}; the final adapter: method finetuned)"
            )
        source = ModelSource.resolve(str(checkpoint))
        if source.is_adapter:
            self._check_adapter(method, Path(source.path))
        elif method.step is not None:
            raise AdapterError(
                f"method {method.name}: {source.path} is not an adapter folder written by actstore finetune"
            )
        return source

    def _check_adapter(self, method: Method, folder: Path) -> None:
        record = finished_adapter(folder)
        if record["recipe"]["base"]["fingerprint"] != self._fingerprint(self.base):
            raise AdapterError(
                f"{folder} was trained on another base model ({record['recipe']['base']['model_id']}, "
                f"{record['recipe']['base']['fingerprint'][:19]}), not on {self.base.model_id}"
            )
        training = record["training"]
        if training["split"] != "test":
            return  # trained on dev/val: never among the test questions probed
        if record["recipe"]["dataset"]["sha256"] != self.dataset.sha256:
            log.warning(
                "%s was trained on another dataset (%s): overlap with %s cannot be checked by id",
                folder,
                record["recipe"]["dataset"]["name"],
                self.dataset.name,
            )
            return
        overlap = sorted(set(training["ids"]) & {q.id for q in self.selection.queries})
        if overlap:
            raise AdapterError(
                f"method {method.name}: {folder} was trained on {len(overlap)} of the questions this run probes "
                f"(ids {', '.join(map(str, overlap[:5]))}{'...' if len(overlap) > 5 else ''}); ingest with at "
                f"least the --train-pool the adapter was trained with, so its questions are held out"
            )

    def _fingerprint(self, source: ModelSource) -> str:
        if source not in self._fingerprints:
            self._fingerprints[source] = source.fingerprint()
        return self._fingerprints[source]

    def recipe_of(self, method: Method, source: ModelSource) -> dict:
        """Everything that decides the stored values; a run only ever holds samples of one recipe."""
        recipe = {
            "model_id": self.base.model_id,  # with the fingerprint, not the path: stores move between machines
            "model_fingerprint": self._fingerprint(self.base),
            "method": method.name,
            "k": method.k,
            "prompt_format": PROMPT_FORMAT,
            "shot_source": self.selection.shot_source,
            "shot_seed": self.opts.shot_seed,
            "train_source": train_source(self.selection, self.opts.train_pool),
            "site": self.opts.site,
            "token_position": -1,
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "dataset": {"name": self.dataset.name, "sha256": self.dataset.sha256},
        }
        if method.finetuned:
            recipe["checkpoint"] = {"model_id": source.model_id, "fingerprint": self._fingerprint(source)}
            if source.is_adapter:
                recipe["adapter"] = _ADAPTER_WORDS[self.opts.adapter_branch]
        return recipe

    def _pending(self, method: Method, recipe: dict) -> list[Question]:
        if not self.store.has_run(self.name, method.name) or self.opts.overwrite:
            return storage_order(self.selection.queries)
        run = self.store.run(self.name, method.name)
        run.check_recipe(recipe)  # the writer checks again under its lock; failing here spares loading the model
        return _missing(self.selection.queries, run.labels()["sample"])

    # -- running --------------------------------------------------------------------------------

    def model(self, source: ModelSource) -> LoadedModel:
        """The loaded model of ``source``; an adapter is attached, unmerged, to a copy of the base each time it
        is asked for (one probe each), the other models are loaded once."""
        if source.is_adapter:
            branch = None if self.opts.adapter_branch == "float32" else self.dtype
            return attach_adapter(self.model(self.base), source, branch)
        if source not in self._loaded:
            self._loaded[source] = load_model(source, self.device, self.dtype)
        return self._loaded[source]

    def run(self, plan: Plan, later: Sequence[Plan] = ()) -> RunReport:
        """Run the model over the plan's pending questions, committing as it goes; resumable at any kill.

        The run's lock is taken first, so a second writer of the run is refused before the model loads. Then
        runs that would not fit the store's disk, this one and the ``later`` ones this ingest writes after it,
        are refused before anything is written.
        """
        method = plan.method
        with self.store.begin_run(
            self.name,
            method.name,
            recipe=plan.recipe,
            overwrite=self.opts.overwrite,
            commit_seconds=self.opts.commit_seconds,
        ) as writer:
            load_started = time.perf_counter()
            loaded = self.model(plan.source)
            started = time.perf_counter()
            extractor = StateExtractor(loaded, self.opts.site)
            pending = _missing(self.selection.queries, writer.committed_ids())  # again, under the lock
            shots = {s: self.selection.shots(s, method.k) for s in self.selection.shot_pool}
            if self.opts.space_check and pending:
                first = build_prompt(pending[0], shots[pending[0].subject], self.opts.shot_seed)
                self._check_room(extractor, first, [plan, *later])
            batch_size = self.opts.batch_size or writer.stored_attrs.get("batch_size") or DEFAULT_BATCH_SIZE
            writer.start(
                provenance=self._provenance(loaded, method, extractor),
                attrs={"batch_size": batch_size},
                n_layers=loaded.n_blocks + 1,
                hidden=loaded.hidden_size,
                planned=writer.n_committed + len(pending),
                history=self._history_entry(len(pending), batch_size),
            )
            with tqdm(total=len(pending), unit="q", desc=f"{self.name}/{method.name}", mininterval=1.0) as bar:
                for batch in _batches(pending, batch_size):
                    prompts = [build_prompt(q, shots[q.subject], self.opts.shot_seed) for q in batch]
                    states, predictions = extractor(prompts)
                    writer.add(states, _labels(batch, predictions))
                    bar.update(len(batch))
        run = self.store.run(self.name, method.name)
        return RunReport(
            self.name,
            method.name,
            len(pending),
            run.n_samples,
            run.accuracy,
            run.size_bytes(),
            time.perf_counter() - started,
            started - load_started,
        )

    def _check_room(self, extractor: StateExtractor, prompt: str, plans: Sequence[Plan]) -> None:
        """Refuse ``plans`` (NotEnoughSpace) where their questions' states, compressed as one probe's, exceed the
        free space of the store's disk (the runs they replace counted as free)."""
        states, _ = extractor([prompt])
        n_questions = sum(len(plan.pending) for plan in plans)
        methods = [plan.method.name for plan in plans]
        after = f" and the {len(plans) - 1} run{'s' * (len(plans) > 2)} after it" if len(plans) > 1 else ""
        self.store.check_room(
            compressed_nbytes(states) * n_questions,
            f"{self.name}/{methods[0]}{after}",
            NO_ROOM,
            [(self.name, method) for method in methods] if self.opts.overwrite else [],
        )

    def _provenance(self, loaded: LoadedModel, method: Method, extractor: StateExtractor) -> dict:
        tok = loaded.tokenizer
        return {
            "model_id": self.base.model_id,
            "model_location": self.base.location,
            "model_name": self.name,
            "revision": getattr(loaded.model.config, "_commit_hash", None),
            "architecture": type(loaded.model).__name__,
            "checkpoint_location": loaded.source.location if method.finetuned else None,
            "finetune": _finetune_provenance(loaded.source) if method.finetuned else None,
            "tokenizer": {
                "name_or_path": tok.name_or_path,
                "class": type(tok).__name__,
                "vocab_size": len(tok),
                "padding_side": tok.padding_side,
                "bos_token": tok.bos_token,
                "letter_token_ids": extractor.letter_ids,
            },
            "prompt": {
                "format": PROMPT_FORMAT,
                "k": method.k,
                "shot_ids": {s: [q.id for q in pool[: method.k]] for s, pool in self.selection.shot_pool.items()},
                "shot_order": "per-query permutation, numpy default_rng([seed, sample id])"
                if self.opts.shot_seed is not None
                else "fixed (pool order)",
                "shot_seed": self.opts.shot_seed,
            },
            "site": self.opts.site,
            "site_description": _SITE_DESCRIPTIONS[self.opts.site],
            "device": str(loaded.device),
            "sample_order": "by subject, then question length, then id; appended ingests follow",
            "created": now(),
            "access": self.opts.access(),
        }

    def _history_entry(self, n_added: int, batch_size: int) -> dict:
        return {
            "time": now(),
            "selection": self.selection.description,
            "added": n_added,
            "batch_size": batch_size,
            "versions": versions(),
            "python": platform.python_version(),
        }


_ADAPTER_WORDS = {
    "float32": "unmerged: the base in the compute dtype, the LoRA branch beside it in float32 (the authors' "
    "PeftModel.from_pretrained)",
    "compute": "unmerged: the base and the LoRA branch beside it both in the compute dtype (as training computed it)",
}

_SITE_DESCRIPTIONS = {
    "normed": "layer i < n_blocks: output of block i's input norm (the normalised residual entering block i); "
    "layer n_blocks: output of the final norm",
    "residual": "transformers hidden_states: layer 0 = embeddings, layer i = output of block i "
    "(the last one after the final norm in Llama-style models)",
}


def _finetune_provenance(source: ModelSource) -> dict | None:
    """What the adapter's record says of its training: recipe, base, training ids, step, loss, accuracy."""
    if not source.is_adapter:
        return None
    record = read_record(Path(source.path))  # checked whole and unaltered when the run was planned
    keep = (
        "recipe",
        "training",
        "step",
        "total_steps",
        "epoch",
        "final_loss",
        "losses",
        "accuracy",
        "adapter",
        "checkpoints",
        "stopped_early",
        "time",
    )
    return {key: record.get(key) for key in keep}


def _missing(queries: list[Question], stored_ids: np.ndarray) -> list[Question]:
    stored = set(np.asarray(stored_ids).tolist())
    return storage_order([q for q in queries if q.id not in stored])


def _batches(items: list[Question], size: int) -> Iterator[list[Question]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _labels(batch: list[Question], predictions: np.ndarray) -> dict[str, np.ndarray]:
    answers = np.array([q.answer for q in batch], dtype=object)
    return {
        "sample": np.array([q.id for q in batch], dtype="int64"),
        "subject": np.array([q.subject for q in batch], dtype=object),
        "answer": answers,
        "prediction": predictions.astype(object),
        "correct": predictions == answers.astype(str),
    }


def versions() -> dict[str, str]:
    """Versions of the packages that decide the stored values, for the provenance."""
    found = {}
    for package in _VERSIONED:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def estimate(ingest: Ingest, plan: Plan) -> dict:
    """What ``--dry-run`` prints: questions, tokens, time and bytes, from one timed batch; writes nothing."""
    shots = {s: ingest.selection.shots(s, plan.method.k) for s in ingest.selection.shot_pool}
    prompts = [build_prompt(q, shots[q.subject], ingest.opts.shot_seed) for q in plan.pending]
    result = {
        "run": f"{ingest.name}/{plan.method.name}",
        "questions": len(prompts),
        "tokens": 0,
        "seconds": 0.0,
        "bytes": 0,
    }
    if not prompts:
        return result
    loaded = ingest.model(plan.source)
    lengths = [len(ids) for ids in loaded.tokenizer(prompts)["input_ids"]]
    batch_size = ingest.opts.batch_size or DEFAULT_BATCH_SIZE
    middle = len(prompts) // 2
    sample = prompts[middle : middle + batch_size]
    extractor = StateExtractor(loaded, ingest.opts.site)
    extractor(sample[:1])  # warm-up
    started = time.perf_counter()
    states, _ = extractor(sample)
    seconds_per_token = (time.perf_counter() - started) / (len(sample) * max(lengths[middle : middle + batch_size]))
    ratio = states.nbytes / compressed_nbytes(states)
    result.update(
        tokens=int(sum(lengths)),
        seconds=_padded_tokens(lengths, batch_size) * seconds_per_token,
        bytes=int(states.nbytes / len(sample) * len(prompts) / ratio),
    )
    return result


def _padded_tokens(lengths: list[int], batch_size: int) -> int:
    return sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )


def ingest_all(opts: IngestOptions, say: Callable[[str], None] = log.info) -> str:
    """Ingest every method of ``opts``, telling ``say`` one line per run (the CLI prints them); returns the
    model's name in the store."""
    ingest = Ingest(opts)
    with ingest.store.writing():  # a store this ingest creates is removed again if it fails before committing
        plans = list(ingest.plans())
        for i, plan in enumerate(plans):
            if not plan.pending:
                say(f"{ingest.name}/{plan.method.name}: up to date, nothing to do")
                continue
            r = ingest.run(plan, later=[later for later in plans[i + 1 :] if later.pending])
            accuracy = f"{r.accuracy:.3f}" if r.accuracy is not None else "-"
            say(
                f"{r.model}/{r.method}: +{r.added} questions ({r.samples} stored), accuracy {accuracy}, "
                f"{r.size_bytes / 1e6:.1f} MB on disk, {r.seconds:.1f} s ({r.added / r.seconds:.1f} questions/s; "
                f"model loaded in {r.load_seconds:.1f} s)"
            )
    return ingest.name
