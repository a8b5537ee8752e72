"""The main job: ingest a model on MMLU under several methods, fine-tune it with the study's LoRA recipe
and probe the adapter and its checkpoints, serve the store on a local port, run the study's analyses
through the client as a remote user would, and write the results.

Every step reuses what is already there: the ingest skips stored questions, a finished adapter is not
trained again, the server answers analyses from the store's cache, so a rerun redraws the results in
seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from actstore.client import Client
from actstore.finetune.options import FinetuneOptions, Hyperparameters
from actstore.ingest.options import PACKAGED_SMOLLM2, IngestOptions
from actstore.ingest.selection import TRAIN_POOL_SIZE
from actstore.server.process import ServerProcess
from actstore.store import DEFAULT_STORE
from actstore.store.folder import Folder
from actstore.store.url import locate

log = logging.getLogger(__name__)

METHODS = ["0shot", "1shot", "2shot", "5shot"]
# The default size: 50 questions from each of 8 MMLU subjects with short questions, from eight fields
# (400 questions per method; the whole job in about 6 minutes here with the environment built). The
# density analyses need many samples per subject (density k = 16, dendrogram clusters over 30 points):
# 3 questions from each of the 57 subjects gave one cluster at almost every layer and no subject label
# overlap at all (k = int(0.3 x 3) = 0).
SUBJECTS = [
    "world_religions",
    "conceptual_physics",
    "elementary_mathematics",
    "high_school_geography",
    "medical_genetics",
    "management",
    "human_aging",
    "electrical_engineering",
]
PER_SUBJECT = 50
# The fine-tuned arm of the job, sized to fit the whole job in 15 minutes on 2 cores: the pool spans every
# subject, as the study's (dev+val of all 57), but takes 6 of the 20 held-out questions per subject (4
# trained on, 2 measuring held-out accuracy: 228 and 114 on the packaged MMLU), for 1 epoch (15 steps), with
# 4 log-spaced checkpoints (1, 2, 4, 8 of 15), every one probed. 8 trained questions per subject (29 steps,
# 5 checkpoints) took the job to 20.5 minutes here: long prompts of the law and history subjects make a
# training question cost ~0.8 s on a CPU. Each probe of 400 questions keeps the adapter unmerged, its LoRA
# branch in the compute dtype: measured here, 2.0x the base model's probe time, against 5.6x with the
# authors' float32 branch (bench/finetune.py).
JOB_TRAIN_POOL = 6
JOB_EPOCHS = 1
JOB_CHECKPOINTS = 4
JOB_ADAPTER_BRANCH = "compute"


@dataclass
class StudyOptions:
    store: str | Path = DEFAULT_STORE  # a folder or s3://bucket/prefix
    results: Path = Path("results")
    model: str = PACKAGED_SMOLLM2
    gguf_file: str | None = None
    checkpoint: str | None = None
    name: str | None = None
    dataset: str = "mmlu"
    subjects: list[str] | None = None  # None: see _selection; []: every subject
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    per_subject: int | None = None  # None: see _selection
    compare: list[tuple[str, str]] = field(default_factory=lambda: [("0shot", "5shot")])
    dask_workers: int | None = None
    finetune: bool = True  # the fine-tuned arm: train an adapter, probe it and its checkpoints
    adapter: Path | None = None  # where the adapter is trained (default: see adapter_folder)
    train_pool: int = TRAIN_POOL_SIZE
    limit: int | None = None  # questions per method in all, spread across subjects
    adapter_branch: str = JOB_ADAPTER_BRANCH

    @property
    def adapter_folder(self) -> Path:
        """``adapter``, else STORE-finetuned beside a store folder; a bucket's store trains its adapter in the
        working directory, in BUCKET-PREFIX-finetuned (the trainer writes a local folder; named after the store
        so that a rerun finds it)."""
        if self.adapter:
            return self.adapter
        location = locate(self.store)
        if isinstance(location, Folder):
            return location.path.with_name(location.path.name + "-finetuned")
        return Path(location.url.split("://", 1)[1].replace("/", "-") + "-finetuned")


def run_study(opts: StudyOptions) -> list[Path]:
    """The whole job; returns the files written under ``opts.results``."""
    from actstore.ingest.pipeline import ingest_all  # loads torch

    store = locate(opts.store)  # an unknown URL scheme is refused before any work
    log.info("[1/4] ingest: %s into %s", ", ".join(opts.methods), store)
    ingest = ingest_options(opts)
    model = ingest_all(ingest)
    if opts.finetune:
        opts.methods = opts.methods + _finetuned_arm(opts, ingest)
        opts.compare = opts.compare + [(m, "finetuned") for m in ("0shot", "5shot") if m in opts.methods]
    opts.results.mkdir(parents=True, exist_ok=True)
    extra = ["--dask-workers", str(opts.dask_workers)] if opts.dask_workers else []
    with ServerProcess(opts.store, opts.results / "server.log", *extra) as server:
        log.info("[2/4] serving %s on %s (log: %s)", opts.store, server.address, opts.results / "server.log")
        with Client(server.address, retries=8) as client:
            written = _analyse_through(client, model, opts)
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"the server exited with {code}; see {opts.results / 'server.log'}")
    log.info(
        "[4/4] server stopped cleanly; results in %s\n%s",
        opts.results.resolve(),
        "\n".join(f"   {path}" for path in written),
    )
    return written


def ingest_options(opts: StudyOptions) -> IngestOptions:
    """The ingest of the job's ICL methods: its selection (``--limit`` spread across subjects) and pools."""
    return IngestOptions(
        store=opts.store,
        model=opts.model,
        gguf_file=opts.gguf_file,
        checkpoint=opts.checkpoint,
        name=opts.name,
        methods=opts.methods,
        dataset=opts.dataset,
        train_pool=opts.train_pool,
        limit=opts.limit,
        **_selection(opts),
    )


def _finetuned_arm(opts: StudyOptions, ingest: IngestOptions) -> list[str]:
    """Train the adapter on the training pool of every subject (or find it trained), then probe it and every
    one of its checkpoints; returns the methods added."""
    from actstore.finetune.train import Finetune
    from actstore.ingest.pipeline import ingest_all

    log.info("[1/4] fine-tuning %s on the training pool of every subject into %s", opts.model, opts.adapter_folder)
    finetune = Finetune(
        FinetuneOptions(
            out=opts.adapter_folder,
            model=opts.model,
            gguf_file=opts.gguf_file,
            dataset=opts.dataset,
            train_pool=min(JOB_TRAIN_POOL, opts.train_pool),
            hyper=Hyperparameters(epochs=JOB_EPOCHS),
            checkpoints=JOB_CHECKPOINTS,
        )
    )
    record = finetune.run()
    accuracy = record["accuracy"]
    log.info(
        "   %d questions, %d steps, final loss %.4f, held-out accuracy (%d questions) %s",
        len(finetune.questions),
        record["step"],
        record["final_loss"],
        accuracy["n_held_out"],
        ", ".join(f"step {step} {value:.3f}" for step, value in accuracy["held_out"] if value is not None),
    )
    methods = [f"finetuned-step{step}" for step in finetune.checkpoint_steps()] + ["finetuned"]
    ingest_all(
        replace(ingest, methods=methods, checkpoint=str(opts.adapter_folder), adapter_branch=opts.adapter_branch)
    )
    return methods


def _selection(opts: StudyOptions) -> dict:
    """The embedded default size (SUBJECTS x PER_SUBJECT on the packaged MMLU) unless asked otherwise: a
    per-subject count alone covers every subject (200: the study's size)."""
    if opts.subjects is None and opts.per_subject is None and opts.dataset == "mmlu":
        return {"subjects": list(SUBJECTS), "per_subject": PER_SUBJECT}
    return {"subjects": opts.subjects or None, "per_subject": opts.per_subject or PER_SUBJECT}


def _analyse_through(client: Client, model: str, opts: StudyOptions) -> list[Path]:
    from actstore.study.report import write_results  # matplotlib loads only when results are written

    runs = {r["method"]: r for r in client.runs(model=model) if r["method"] in opts.methods}
    for method in opts.methods:
        r = runs[method]
        log.info(
            "   %s/%s: %d questions, %d layers x %d, accuracy %.3f",
            model,
            method,
            r["n_samples"],
            r["n_layers"],
            r["hidden"],
            r["accuracy"],
        )
    n_layers = min(r["n_layers"] for r in runs.values())
    last = opts.methods[-1]
    sample = client.hidden_states(model, last, layers=n_layers // 2, samples=slice(0, 8))
    log.info(
        "   fetched a slice of %s/%s: layer %d, samples %s, shape %s",
        model,
        last,
        n_layers // 2,
        sample.sample.values.tolist(),
        dict(sample.sizes),
    )
    pairs = [pair for pair in opts.compare if set(pair) <= set(opts.methods)]
    job = client.analyze(model, opts.methods, layers=range(1, n_layers), preset="paper", compare=pairs)
    log.info(
        "[3/4] analyses: %d methods x %d layers%s (job %s)",
        len(opts.methods),
        n_layers - 1,
        f", {', '.join(' vs '.join(p) for p in pairs)} compared per layer" if pairs else "",
        job.id,
    )
    job.follow("analyses")
    results = job.result()
    failed = int((results.error != "").sum())
    if failed:
        log.warning("%d layer analyses failed (reasons in summary.md)", failed)
    training = {
        m: client.describe(model, m)["attributes"]["finetune"] for m in opts.methods if m.startswith("finetuned")
    }
    return write_results(
        opts.results,
        model,
        results,
        {m: runs[m]["accuracy"] for m in opts.methods},
        {m: runs[m]["n_samples"] for m in opts.methods},
        job.dendrogram,
        training,
    )
