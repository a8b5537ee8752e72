"""``actstore study`` (the main job, end to end) and ``actstore plot`` (its figures from a store)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from actstore.arguments import add_store_argument, csv_list, positive
from actstore.ingest.options import add_source_arguments
from actstore.study.job import JOB_ADAPTER_BRANCH, METHODS, PER_SUBJECT, SUBJECTS

if TYPE_CHECKING:
    from actstore.study.report import Settings

FORMATS = ("png", "svg", "pdf")  # figures.FORMATS, named here so that the parser loads no matplotlib


def _pair(text: str) -> tuple[str, str]:
    pair = csv_list(text)
    if len(pair) != 2:
        raise argparse.ArgumentTypeError(f"expected two methods A,B, got {text!r}")
    return pair[0], pair[1]


def _subjects(text: str) -> list[str]:
    return [] if text == "all" else csv_list(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "study",
        help="the study's analysis of a model, end to end: ingest, fine-tune, serve, analyse, figures",
        description="Ingest a model on MMLU under several methods, fine-tune it with the study's LoRA recipe and "
        "probe the adapter and its checkpoints, serve the store on a free local port, run the study's "
        "density analyses of every method and layer through the client, compare methods layer by "
        "layer, write figures, tables and a summary, stop the server. A rerun reuses what is stored.",
    )
    add_store_argument(p)
    p.add_argument("--results", type=Path, default=Path("results"), help="output folder (default: %(default)s)")
    add_source_arguments(p, methods=tuple(METHODS))
    p.add_argument(
        "--subjects",
        type=_subjects,
        help="comma list of subject ids, or 'all' (default: every subject, except for the embedded "
        f"default size on the packaged MMLU: {PER_SUBJECT} questions of {','.join(SUBJECTS)})",
    )
    p.add_argument(
        "--per-subject",
        type=positive,
        help=f"questions per subject, over every subject unless --subjects (default: {PER_SUBJECT}; "
        "200 is the study's size)",
    )
    p.add_argument("--limit", type=positive, help="at most N questions per method, spread across the subjects")
    p.set_defaults(adapter_branch=JOB_ADAPTER_BRANCH)  # the job's probes: see actstore.study.job
    p.add_argument(
        "--compare",
        type=_pair,
        default=("0shot", "5shot"),
        metavar="A,B",
        help="two methods compared layer by layer (default: 0shot,5shot; 0shot and 5shot are compared "
        "with finetuned too)",
    )
    p.add_argument(
        "--no-finetune",
        dest="finetune",
        action="store_false",
        help="skip the fine-tuned arm (by default an adapter is trained with the study's recipe on the "
        "training pool of every subject, and it and every one of its checkpoints are probed)",
    )
    p.add_argument(
        "--adapter",
        type=Path,
        help="the fine-tuning folder, always local (default: STORE-finetuned beside a store folder; for "
        "an s3://BUCKET/PREFIX store, BUCKET-PREFIX-finetuned in the working directory)",
    )
    p.add_argument("--dask-workers", type=positive, help="the server's Dask worker processes (default: one per core)")
    p.set_defaults(func=run_study_command)

    plot = subparsers.add_parser(
        "plot",
        help="draw a study's figures from the analyses stored in a store",
        description="Write the layers figure (and training steps, when there are "
        "checkpoints), the dendrogram of an early layer, the CSV tables and "
        "summary.md for a model's runs, from the analyses stored with them. "
        "They are looked up with the study's settings (the paper preset over "
        "every sample) unless the flags below name others, as "
        "`actstore analyze` took them.",
    )
    add_store_argument(plot)
    plot.add_argument("--model", required=True, help="model name in the store (see actstore ls)")
    plot.add_argument("--methods", type=csv_list, help="comma list of methods (default: every run of the model)")
    plot.add_argument(
        "--compare",
        type=_pair,
        action="append",
        metavar="A,B",
        help="a pair whose data overlap is drawn, repeatable (default: 0shot,5shot, and 0shot,finetuned "
        "and 5shot,finetuned where there is a finetuned run)",
    )
    plot.add_argument("--out", type=Path, required=True, help="output folder")
    plot.add_argument("--format", choices=FORMATS, default="png", help="figure file format (default: %(default)s)")
    plot.add_argument(
        "--per-subject",
        type=positive,
        help="the analyses of the first N samples of each subject (as analyze --per-subject N)",
    )
    for name, kind in (
        ("maxk", int),
        ("density-k", int),
        ("z", float),
        ("subject-fraction", float),
        ("answer-fraction", float),
    ):
        plot.add_argument(f"--{name}", type=kind, help=f"the analyses with this {name} (as analyze --{name})")
    plot.set_defaults(func=run_plot_command)


def run_study_command(args: argparse.Namespace) -> int:
    from actstore.study.job import StudyOptions, run_study

    run_study(
        StudyOptions(
            store=args.store,
            results=args.results,
            model=args.model,
            gguf_file=args.gguf_file,
            checkpoint=args.checkpoint,
            name=args.name,
            dataset=args.dataset,
            subjects=args.subjects,
            methods=args.methods,
            per_subject=args.per_subject,
            compare=[args.compare],
            dask_workers=args.dask_workers,
            finetune=args.finetune,
            adapter=args.adapter,
            train_pool=args.train_pool,
            limit=args.limit,
            adapter_branch=args.adapter_branch,
        )
    )
    return 0


def run_plot_command(args: argparse.Namespace) -> int:
    from actstore.study.stored import plot_stored

    for path in plot_stored(args.store, args.model, args.methods, args.out, args.compare, _settings(args), args.format):
        print(path)
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    """The settings the plot flags name: the paper preset with their values, over their sample mask."""
    from actstore.analysis.density import PAPER, DensityParams
    from actstore.analysis.layers import Mask
    from actstore.study.report import Settings

    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(DensityParams)
        if getattr(args, f.name, None) is not None
    }
    return Settings(dataclasses.replace(PAPER, **overrides), Mask(args.per_subject), given=frozenset(overrides))
