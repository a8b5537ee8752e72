"""What a fine-tuning run can be asked to do, with the study's recipe as defaults; importable without torch.

The defaults are Doimo et al.'s published command (REFERENCE.md, section 1): LoRA rank 64, alpha 16,
dropout 0.1 on every linear projection of the blocks; loss on the answer letter alone; samples weighted
by the inverse size of their subject; AdamW at 1e-4 with 5 % linear warm-up then cosine decay to 1 % of
the rate, weight decay 0, gradients clipped at 1.0; batches of 16; 4 epochs; a checkpoint every 10 steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from actstore.ingest.options import PACKAGED_SMOLLM2
from actstore.ingest.selection import TRAIN_POOL_SIZE


@dataclass(frozen=True)
class Hyperparameters:
    """Everything about the optimisation that decides the weights (with the data, the seed and the dtype)."""

    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: str = "all-linear"  # peft: every linear layer of the blocks (q/k/v/o/gate/up/down in Llama)
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 16  # questions per optimizer step (micro-batches accumulate to it)
    epochs: int = 4
    max_length: int = 1024  # prompt tokens; longer prompts lose their beginning
    seed: int = 42

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneOptions:
    out: Path
    model: str = PACKAGED_SMOLLM2
    gguf_file: str | None = None
    dataset: str = "mmlu"
    subjects: list[str] | None = None
    train_pool: int = TRAIN_POOL_SIZE
    hyper: Hyperparameters = field(default_factory=Hyperparameters)
    save_every: int = 10  # steps between checkpoints (the study probed the model at checkpoints across training)
    micro_batch: int = 8  # questions per forward/backward pass; does not change the recipe
    dtype: str = "auto"
    device: str = "auto"
    overwrite: bool = False
