"""``actstore finetune``: train the study's LoRA adapter on the answer letter, with checkpoints to probe."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from actstore.arguments import csv_list, non_negative, positive
from actstore.finetune.options import CHECKPOINTS, FinetuneOptions, Hyperparameters
from actstore.ingest.options import PACKAGED_SMOLLM2
from actstore.ingest.selection import EVAL_PER_SUBJECT, TRAIN_POOL_SIZE

_HYPER_HELP = {
    "rank": "LoRA rank",
    "alpha": "LoRA alpha",
    "dropout": "LoRA dropout",
    "target_modules": "peft target modules: 'all-linear' or a comma list of module names",
    "learning_rate": "AdamW learning rate",
    "warmup_ratio": "share of the steps in linear warm-up",
    "max_warmup_steps": "warm-up steps at most",
    "min_lr_ratio": "the warm-up starts at and the cosine decay ends at this share of the learning rate",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "clip the global gradient norm at this value; 0: no clipping (the authors')",
    "batch_size": "questions per optimizer step",
    "epochs": "passes over the training questions",
    "max_length": "prompt tokens at most (longer prompts lose their beginning)",
    "seed": "seed of the adapter's initialisation, dropout and the data order",
    "subject_header": "train on the probes' prompt, subject header included (the authors trained without it)",
}


def _hyper_type(name: str, kind: type):
    if kind is int:
        return {"seed": int, "max_warmup_steps": non_negative}.get(name, positive)
    return kind


def _add_hyperparameters(p: argparse.ArgumentParser) -> None:
    for f in fields(Hyperparameters):
        flag, kind = f"--{f.name.replace('_', '-')}", type(f.default)
        if kind is bool:
            p.add_argument(flag, action="store_true", help=_HYPER_HELP[f.name])
        else:
            p.add_argument(
                flag,
                type=_hyper_type(f.name, kind),
                default=f.default,
                help=f"{_HYPER_HELP[f.name]} (default: %(default)s)",
            )


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="train the study's LoRA adapter (the fine-tuned arm) with checkpoints to probe",
        description="Train a LoRA adapter with peft on MMLU questions as the study's authors did (their training "
        "prompt, schedule and checkpoints), the loss on the answer letter alone, and write it to --out as a "
        "peft adapter folder with checkpoint-STEP/ folders. "
        "Probe it with `actstore ingest --methods finetuned,finetuned-stepN --checkpoint OUT`. "
        "Rerunning the same command after an interruption resumes from the last checkpoint.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder of the adapter and its checkpoints")
    p.add_argument(
        "--model",
        default=PACKAGED_SMOLLM2,
        help="base model: folder, hub id (local cache only when offline), .gguf file, or 'smollm2' "
        "(default; GGUF weights are de-quantized for training)",
    )
    p.add_argument("--gguf-file", help="GGUF file inside --model's folder")
    p.add_argument(
        "--dataset",
        default="mmlu",
        help="'mmlu' (packaged test split: a training pool is held out of it), an MMLU CSV folder "
        "(trains on dev/ + val/) or a JSONL file",
    )
    p.add_argument("--subjects", type=csv_list, help="comma list of subject ids (default: all)")
    p.add_argument(
        "--train-pool",
        type=non_negative,
        default=TRAIN_POOL_SIZE,
        help="fine-tuning questions per subject (default %(default)s, the study's); held out of the test "
        "split when the data has no dev/val, and then excluded from every ingest with the same value",
    )
    p.add_argument(
        "--eval-per-subject",
        type=non_negative,
        default=EVAL_PER_SUBJECT,
        help="of each subject's pool, the last N are not trained on but measure held-out accuracy at "
        "every checkpoint (default %(default)s)",
    )
    p.add_argument("--limit", type=positive, help="at most N training questions in all, spread across subjects")
    _add_hyperparameters(p)
    p.add_argument(
        "--checkpoints",
        type=non_negative,
        default=CHECKPOINTS,
        help="log-spaced checkpoint steps, the authors' np.geomspace(1, steps, N, endpoint=False) rounded, "
        "besides every epoch's end (default %(default)s)",
    )
    p.add_argument("--save-every", type=positive, help="instead of --checkpoints: a checkpoint every K steps")
    p.add_argument(
        "--stop-accuracy",
        type=_share,
        help="end training at the first checkpoint whose held-out accuracy reaches this share (e.g. the "
        "5-shot accuracy); the adapter is that checkpoint's",
    )
    p.add_argument(
        "--micro-batch",
        type=positive,
        default=8,
        help="questions per forward/backward pass; gradients accumulate to --batch-size (default 8)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="base model dtype (auto: bf16 on CUDA and CPUs with native bf16, else float32); the "
        "adapter trains in float32",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--overwrite", action="store_true", help="replace a run of a different recipe in --out")
    p.add_argument("--dry-run", action="store_true", help="print questions, steps, time and memory; train nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from actstore.finetune.train import Finetune  # loads torch, transformers and peft

    hyper = Hyperparameters(**{f.name: getattr(args, f.name) for f in fields(Hyperparameters)})
    finetune = Finetune(
        FinetuneOptions(
            out=args.out,
            model=args.model,
            gguf_file=args.gguf_file,
            dataset=args.dataset,
            subjects=args.subjects,
            train_pool=args.train_pool,
            eval_per_subject=args.eval_per_subject,
            limit=args.limit,
            hyper=hyper,
            checkpoints=args.checkpoints,
            save_every=args.save_every,
            stop_accuracy=args.stop_accuracy,
            micro_batch=args.micro_batch,
            dtype=args.dtype,
            device=args.device,
            overwrite=args.overwrite,
        )
    )
    if args.dry_run:
        e = finetune.estimate()
        print(
            f"{e['questions']} training questions from {e['subjects']} subjects, {e['steps']} steps "
            f"({e['steps_per_epoch']} per epoch x {hyper.epochs}), checkpoints at steps "
            f"{', '.join(map(str, finetune.schedule))}, {e['trainable_parameters']:,} adapter "
            f"parameters, {e['compute_dtype']} on {e['device']}\n"
            f"estimated time {e['seconds']:.0f} s, peak memory of one step {e['peak_memory_bytes'] / 2**30:.2f} GiB"
        )
        return 0
    if finetune.status().done:
        print(f"{args.out}: up to date, nothing to do")
    record = finetune.run()
    accuracy, steps = record["accuracy"], finetune.checkpoint_steps()
    saved = f"checkpoints at steps {', '.join(map(str, steps))}" if steps else "no checkpoints"
    held_out = "-" if accuracy["before"] is None else f"{accuracy['before']:.3f} -> {accuracy['after']:.3f}"
    stopped = " (stopped at --stop-accuracy)" if record.get("stopped_early") else ""
    print(
        f"{args.out}: {record['training']['n_questions']} questions, {record['step']} steps{stopped}, final loss "
        f"{record['final_loss']:.4f}, held-out accuracy ({accuracy['n_held_out']} questions) {held_out}; {saved}"
    )
    return 0
