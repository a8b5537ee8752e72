"""The study's fine-tuned arm: a LoRA adapter trained on the answer letter, with checkpoints across training.

``actstore finetune`` writes a peft adapter folder; ``actstore ingest --methods finetuned[-stepN]
--checkpoint FOLDER`` probes it (or one of its checkpoints) with the 0-shot prompt.
"""

from actstore.adapter import AdapterError

__all__ = ["AdapterError"]
