"""``actstore ingest``: run a model over a question set, or any text dataset, and store every layer's states."""

from __future__ import annotations

import argparse

from actstore.arguments import add_store_argument, csv_list, non_negative, positive
from actstore.ingest.options import DTYPE_NAMES, SITES, STORE_DTYPE_NAMES, IngestOptions, add_source_arguments
from actstore.store import VISIBILITIES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest", help="store the hidden states of a model on a question set", description=__doc__.split(": ", 1)[1]
    )
    add_store_argument(p)
    add_source_arguments(p)
    p.add_argument("--subjects", type=csv_list, help="comma list of subject ids (default: all)")
    p.add_argument("--per-subject", type=positive, help="at most N questions per subject (the study: 200)")
    p.add_argument("--limit", type=positive, help="at most N questions in all")
    p.add_argument(
        "--site",
        choices=SITES,
        default="normed",
        help="normed: each block's input norm + final norm (the study's); residual: HF hidden_states",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default="auto",
        help="compute dtype (auto: bf16 on CUDA and on CPUs with native bf16, else float32)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--batch-size", type=positive, help="questions per forward pass (default 8; a resumed run keeps its own)"
    )
    p.add_argument("--shot-seed", type=int, default=42, help="seed of the per-query shot order (default 42)")
    p.add_argument("--fixed-shot-order", action="store_true", help="show shots in pool order, unshuffled")
    p.add_argument("--overwrite", action="store_true", help="replace a run made with a different recipe")
    p.add_argument(
        "--commit-seconds",
        type=float,
        default=10.0,
        help="commit buffered batches at least this often (default 10), in the background: a kill loses at most about "
        "twice this",
    )
    p.add_argument("--group", help="owner group of the runs this ingest creates (for a served, shared store)")
    p.add_argument(
        "--visibility",
        choices=VISIBILITIES,
        help="who may read new runs when served (default: private with --group, else public)",
    )
    p.add_argument("--share-with", type=csv_list, default=[], help="comma list of groups for --visibility shared")
    p.add_argument("--dry-run", action="store_true", help="print questions, tokens, time and size; write nothing")
    p.add_argument(
        "--no-space-check",
        dest="space_check",
        action="store_false",
        help="write even where the runs' estimated size exceeds the free space of the store's disk",
    )
    add_capture_arguments(p.add_argument_group("capture (any text dataset, sites and token positions)"))
    p.set_defaults(func=run)


def add_capture_arguments(p: argparse._ArgumentGroup) -> None:
    """The options of a capture run (actstore.ingest.capture_run); --text-column or --template selects it."""
    p.add_argument(
        "--text-column",
        help="capture a text dataset (--dataset: JSONL, CSV or Parquet file, a datasets save_to_disk folder, or "
        "'mmlu'): the column holding each text, as given",
    )
    p.add_argument("--template", help="build each text from the columns instead, e.g. 'Q: {question}\\nA:'")
    p.add_argument("--label-columns", type=csv_list, default=[], help="comma list of columns stored as labels")
    p.add_argument(
        "--sites",
        type=csv_list,
        help="comma list of resid_pre, resid_post, attn_out, mlp_out, normed (block i's residual entering and "
        "leaving it, its attention and MLP outputs, its normalised input) or module name patterns over "
        "model.named_modules() such as 'model.layers.*.mlp.act_fn' (optionally NAME=PATTERN); several in "
        "one pass (default: resid_post)",
    )
    p.add_argument(
        "--positions",
        default="last",
        help="last (default), all (every token), mean (over the text), or token indices such as 0,-1 "
        "(negative from the end)",
    )
    p.add_argument(
        "--store-dtype",
        choices=STORE_DTYPE_NAMES,
        default="auto",
        help="dtype of the stored states (auto: the compute dtype's, lossless; float16 rounds bfloat16 "
        "or float32 states, bfloat16 rounds float32 ones)",
    )
    p.add_argument(
        "--top-logits", type=non_negative, default=0, help="also store the K largest next-token logits per row"
    )
    p.add_argument("--max-tokens", type=positive, help="cut each text to its first N tokens")


def run(args: argparse.Namespace) -> int:
    from actstore.ingest.pipeline import Ingest, estimate, ingest_all  # loads torch and transformers

    opts = IngestOptions(
        store=args.store,
        model=args.model,
        gguf_file=args.gguf_file,
        checkpoint=args.checkpoint,
        adapter_branch=args.adapter_branch,
        name=args.name,
        methods=args.methods,
        dataset=args.dataset,
        subjects=args.subjects,
        per_subject=args.per_subject,
        limit=args.limit,
        train_pool=args.train_pool,
        site=args.site,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        shot_seed=None if args.fixed_shot_order else args.shot_seed,
        overwrite=args.overwrite,
        commit_seconds=args.commit_seconds,
        group=args.group,
        visibility=args.visibility,
        shared_with=args.share_with,
        text_column=args.text_column,
        template=args.template,
        label_columns=args.label_columns,
        sites=args.sites,
        positions=args.positions,
        store_dtype=args.store_dtype,
        top_logits=args.top_logits,
        max_tokens=args.max_tokens,
        space_check=args.space_check,
    )
    if opts.captures:
        return _capture(opts, args.dry_run)
    if args.dry_run:
        ingest = Ingest(opts)
        print(f"{'run':40} {'questions':>9} {'tokens':>10} {'est. time':>10} {'est. size':>10}")
        for plan in ingest.plans():
            e = estimate(ingest, plan)
            print(
                f"{e['run']:40} {e['questions']:>9} {e['tokens']:>10} {e['seconds']:>9.0f}s {e['bytes'] / 1e6:>8.1f}MB"
            )
        return 0
    ingest_all(opts, say=print)
    return 0


def _capture(opts: IngestOptions, dry_run: bool) -> int:
    from actstore.ingest.capture_run import CaptureIngest, capture_all, estimate_capture

    if not dry_run:
        capture_all(opts, say=print)
        return 0
    ingest = CaptureIngest(opts)
    print(f"{'run':40} {'texts':>7} {'tokens':>10} {'rows':>10} {'est. time':>10} {'est. size':>10}")
    for job in ingest.jobs:
        e = estimate_capture(ingest, job)
        print(
            f"{e['run']:40} {e['texts']:>7} {e['tokens']:>10} {e['rows']:>10} {e['seconds']:>9.0f}s "
            f"{e['bytes'] / 1e6:>8.1f}MB"
        )
    return 0
