"""What a fine-tuning run can be asked to do, with the study's recipe as defaults; importable without torch.

The defaults are Doimo et al.'s code as published (docs/how-to/finetune.md):
LoRA rank 64, alpha 16, dropout 0.1 on every linear projection of the blocks; the training prompt is the
question, its options and ``Answer:`` without the subject header, the loss on the answer letter alone;
AdamW at 1e-4, weight decay 0, a warm-up of int(0.05 x steps) steps (at most 3) from 1 % of the rate, then
cosine decay to 1 % of the rate; no gradient clipping; batches of 16; checkpoints at 10 log-spaced steps
plus every epoch's end. Samples are weighted by the inverse size of their subject, as the paper's text
says (the authors' code normalises the weights within micro-batches of one question, which cancels them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from actstore.ingest.options import PACKAGED_SMOLLM2
from actstore.ingest.selection import EVAL_PER_SUBJECT, TRAIN_POOL_SIZE

CHECKPOINTS = 10  # log-spaced checkpoints, as the authors' --checkpointing_steps 10


@dataclass(frozen=True)
class Hyperparameters:
    """Everything about the optimisation that decides the weights (with the data, the seed and the dtype)."""

    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: str = "all-linear"  # peft: every linear layer of the blocks (q/k/v/o/gate/up/down in Llama)
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    max_warmup_steps: int = 3
    min_lr_ratio: float = 0.01  # the warm-up starts at, and the cosine decay ends at, this share of the rate
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping (the authors' default, -1 in their code)
    batch_size: int = 16  # questions per optimizer step (micro-batches accumulate to it)
    epochs: int = 4
    max_length: int = 1024  # prompt tokens; longer prompts lose their beginning
    seed: int = 42
    subject_header: bool = False  # the authors trained without it; probes always carry it

    def as_dict(self) -> dict:
        return asdict(self)

    def warmup_steps(self, total_steps: int) -> int:
        return min(int(self.warmup_ratio * total_steps), self.max_warmup_steps)


def lr_factor(step: int, total_steps: int, warmup: int, floor: float) -> float:
    """The authors' schedule (utils/optimizer_utils.py): linear from ``floor`` to 1 over ``warmup`` steps,
    then cosine from 1 down to ``floor`` at ``total_steps``; the smaller of the two at every step."""
    ramp = floor + (1 - floor) * min(step, warmup) / warmup if warmup else 1.0
    progress = max(0, step - warmup) / max(total_steps - warmup, 1)
    return min(ramp, floor + 0.5 * (1 - floor) * (1 + np.cos(progress * np.pi)))


def checkpoint_schedule(total_steps: int, steps_per_epoch: int, n: int | None, every: int | None) -> list[int]:
    """The steps saved as checkpoints before the last: every ``every`` steps if asked, else the authors'
    ``np.unique(np.around(np.geomspace(1, T, n, endpoint=False)))``, plus the end of every epoch. The final
    adapter is the last step's."""
    if every:
        steps = set(range(every, total_steps, every))
    else:
        steps = {int(s) for s in np.unique(np.around(np.geomspace(1, total_steps, n, endpoint=False)))} if n else set()
    steps |= set(range(steps_per_epoch, total_steps, steps_per_epoch))
    return sorted(s for s in steps if 0 < s < total_steps)


@dataclass
class FinetuneOptions:
    out: Path
    model: str = PACKAGED_SMOLLM2
    gguf_file: str | None = None
    dataset: str = "mmlu"
    subjects: list[str] | None = None
    train_pool: int = TRAIN_POOL_SIZE  # held out per subject: the last eval_per_subject measure, the rest train
    eval_per_subject: int = EVAL_PER_SUBJECT
    limit: int | None = None  # training questions in all, spread across subjects
    hyper: Hyperparameters = field(default_factory=Hyperparameters)
    checkpoints: int = CHECKPOINTS  # log-spaced checkpoint steps (the authors'), besides every epoch's end
    save_every: int | None = None  # instead: a checkpoint every this many steps
    stop_accuracy: float | None = None  # end training at the first checkpoint whose held-out accuracy reaches it
    micro_batch: int = 8  # questions per forward/backward pass; does not change the recipe
    dtype: str = "auto"
    device: str = "auto"
    overwrite: bool = False
