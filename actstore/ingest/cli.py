"""``actstore ingest``: run a model over a question set and store every layer's last-token state."""

from __future__ import annotations

import argparse

from actstore.cli import add_store_argument
from actstore.ingest.options import ADAPTER_BRANCHES, DTYPE_NAMES, PACKAGED_SMOLLM2, SITES, IngestOptions
from actstore.ingest.selection import TRAIN_POOL_SIZE
from actstore.store import VISIBILITIES


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_source_arguments(p: argparse.ArgumentParser, methods: tuple[str, ...] = ("0shot",)) -> None:
    """--model, --gguf-file, --checkpoint, --name, --methods, --dataset: shared with ``actstore study``."""
    p.add_argument("--model", default=PACKAGED_SMOLLM2,
                   help="model folder, hub id (local cache only when offline), .gguf file, or 'smollm2' "
                        "for the packaged SmolLM2-135M-Instruct (default)")
    p.add_argument("--gguf-file", help="GGUF file inside --model's folder")
    p.add_argument("--checkpoint", help="for methods finetuned[-stepN]: the folder of `actstore finetune --out` "
                                        "(or any fine-tuned model folder), stored under --model's name")
    p.add_argument("--adapter-branch", choices=ADAPTER_BRANCHES, default="float32",
                   help="an adapter is probed unmerged beside the base; its LoRA branch computes in float32 (the "
                        "authors'; ingest's default) or in the compute dtype (what training computed: 2.0x the base "
                        "model's probe time on a bf16 CPU, against 5.6x; the study job's default) (default: "
                        "%(default)s)")
    p.add_argument("--name", help="model name in the store (default: derived from --model)")
    p.add_argument("--methods", "--method", type=_csv, default=list(methods),
                   help=f"comma list of 0shot, 1shot..5shot, finetuned, finetuned-stepN (--checkpoint's "
                        f"checkpoint-N) (default: {','.join(methods)})")
    p.add_argument("--dataset", default="mmlu",
                   help="'mmlu' (packaged test split, default), an MMLU CSV folder (dev/, val/, test/) or a JSONL file")
    p.add_argument("--train-pool", type=non_negative, default=TRAIN_POOL_SIZE,
                   help="fine-tuning questions per subject held out of every method's questions when the data has "
                        "no dev/val split (default %(default)s; keep it equal to actstore finetune's)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ingest", help="store the hidden states of a model on a question set",
                              description=__doc__.split(": ", 1)[1])
    add_store_argument(p)
    add_source_arguments(p)
    p.add_argument("--subjects", type=_csv, help="comma list of subject ids (default: all)")
    p.add_argument("--per-subject", type=_positive, help="at most N questions per subject (the study: 200)")
    p.add_argument("--limit", type=_positive, help="at most N questions in all")
    p.add_argument("--site", choices=SITES, default="normed",
                   help="normed: each block's input norm + final norm (the study's); residual: HF hidden_states")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="compute dtype (auto: bf16 on CUDA and on CPUs with native bf16, else float32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batch-size", type=_positive, help="questions per forward pass (default 8; a resumed run "
                                                         "keeps its own)")
    p.add_argument("--shot-seed", type=int, default=42, help="seed of the per-query shot order (default 42)")
    p.add_argument("--fixed-shot-order", action="store_true", help="show shots in pool order, unshuffled")
    p.add_argument("--overwrite", action="store_true", help="replace a run made with a different recipe")
    p.add_argument("--commit-seconds", type=float, default=10.0,
                   help="commit buffered batches at least this often (default 10): the most work a kill loses")
    p.add_argument("--group", help="owner group of the runs this ingest creates (for a served, shared store)")
    p.add_argument("--visibility", choices=VISIBILITIES,
                   help="who may read new runs when served (default: private with --group, else public)")
    p.add_argument("--share-with", type=_csv, default=[], help="comma list of groups for --visibility shared")
    p.add_argument("--dry-run", action="store_true", help="print questions, tokens, time and size; write nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from actstore.ingest.pipeline import Ingest, estimate  # loads torch and transformers

    opts = IngestOptions(
        store=args.store, model=args.model, gguf_file=args.gguf_file, checkpoint=args.checkpoint,
        adapter_branch=args.adapter_branch, name=args.name,
        methods=args.methods, dataset=args.dataset, subjects=args.subjects, per_subject=args.per_subject,
        limit=args.limit, train_pool=args.train_pool, site=args.site, dtype=args.dtype, device=args.device, batch_size=args.batch_size,
        shot_seed=None if args.fixed_shot_order else args.shot_seed, overwrite=args.overwrite,
        commit_seconds=args.commit_seconds, group=args.group, visibility=args.visibility,
        shared_with=args.share_with,
    )
    if args.dry_run:
        ingest = Ingest(opts)
        print(f"{'run':40} {'questions':>9} {'tokens':>10} {'est. time':>10} {'est. size':>10}")
        for plan in ingest.plans():
            e = estimate(ingest, plan)
            print(f"{e['run']:40} {e['questions']:>9} {e['tokens']:>10} {e['seconds']:>9.0f}s "
                  f"{e['bytes'] / 1e6:>8.1f}MB")
        return 0
    ingest_all(opts)
    return 0


def ingest_all(opts: IngestOptions) -> str:
    """Ingest every method of ``opts``, printing one line per run; returns the model's name in the store."""
    from actstore.ingest.pipeline import Ingest

    ingest = Ingest(opts)
    with ingest.store.writing():  # a store this ingest creates is removed again if it fails before committing
        for plan in ingest.plans():
            if not plan.pending:
                print(f"{ingest.name}/{plan.method.name}: up to date, nothing to do")
                continue
            r = ingest.run(plan)
            accuracy = f"{r.accuracy:.3f}" if r.accuracy is not None else "-"
            print(f"{r.model}/{r.method}: +{r.added} questions ({r.samples} stored), accuracy {accuracy}, "
                  f"{r.size_bytes / 1e6:.1f} MB on disk, {r.seconds:.1f} s ({r.added / r.seconds:.1f} questions/s; "
                  f"model loaded in {r.load_seconds:.1f} s)")
    return ingest.name
