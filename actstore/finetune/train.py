"""Training a LoRA adapter on the study's 0-shot prompts, the loss on the answer letter alone.

The data order of every epoch is a permutation seeded by (seed, epoch), and a checkpoint holds the
adapter, the optimizer, the schedule and the random state, so training resumed from a checkpoint
after a kill takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from actstore.finetune import folder
from actstore.finetune.folder import AdapterError
from actstore.finetune.options import FinetuneOptions
from actstore.finetune.precision import MasterWeights, use_fast_dropout
from actstore.ingest.datasets import LETTERS, DatasetError, Question, load_dataset
from actstore.ingest.extract import StateExtractor, encode, letter_token_ids
from actstore.ingest.model import LoadedModel, ModelSource, load_model, peft_quietly, resolve_device, resolve_dtype
from actstore.ingest.pipeline import versions
from actstore.ingest.prompts import PROMPT_FORMAT, build_prompt
from actstore.ingest.selection import select, train_source
from actstore.store.lock import FolderLock

log = logging.getLogger(__name__)


def subject_weights(questions: list[Question]) -> np.ndarray:
    """Each question's loss weight: the inverse size of its subject, scaled so the weights average 1, so
    every subject counts equally however many questions it has (the study's weighting)."""
    subjects, inverse, counts = np.unique([q.subject for q in questions], return_inverse=True, return_counts=True)
    return len(questions) / (len(subjects) * counts[inverse])


def letter_losses(model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer letter's token at the prompt's last position (``Answer:``), one value per
    question. No other position is a target: the prompt's own tokens are context only."""
    last = model.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, -1]
    logits = model.get_output_embeddings()(last).float()  # the head on the last position alone, as in ingest
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


@dataclass
class Status:
    """Where a fine-tuning folder stands: ``done``, or the step training (re)starts from."""

    done: bool
    start_step: int


class Finetune:
    """One fine-tuning run: its questions, recipe and output folder; ``run`` trains or resumes."""

    def __init__(self, opts: FinetuneOptions) -> None:
        self.opts = opts
        self.hyper = opts.hyper
        self.source = ModelSource.resolve(opts.model, opts.gguf_file)
        self.dataset = load_dataset(opts.dataset)
        self.selection = select(self.dataset, opts.subjects, train_pool=opts.train_pool)
        self.questions = self.selection.train
        if not self.questions:
            raise DatasetError(f"no training questions in {self.dataset.name} ({self.selection.train_split} split, "
                               f"--train-pool {opts.train_pool})")
        self.device = resolve_device(opts.device)
        self.dtype = resolve_dtype(opts.dtype, self.device)
        self.steps_per_epoch = math.ceil(len(self.questions) / self.hyper.batch_size)
        self.total_steps = self.steps_per_epoch * self.hyper.epochs
        self.prompts = [build_prompt(q, [], None) for q in self.questions]
        self.weights = torch.tensor(subject_weights(self.questions), dtype=torch.float32)
        self.dropout_rng = np.random.default_rng([self.hyper.seed, 1])
        self.recipe = {
            "base": {"model_id": self.source.model_id, "fingerprint": self.source.fingerprint()},
            "dataset": {"name": self.dataset.name, "sha256": self.dataset.sha256},
            "training_questions": train_source(self.selection, opts.train_pool),
            "subjects": sorted({q.subject for q in self.questions}),
            "prompt_format": PROMPT_FORMAT + ", 0-shot",
            "target": "the answer letter's token after 'Answer:'; no other position is a target",
            "weighting": "inverse subject size",
            "optimizer": "AdamW",
            "schedule": "linear warm-up, then cosine down to min_lr_ratio x the learning rate",
            "hyperparameters": self.hyper.as_dict(),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
        }

    # -- what is there --------------------------------------------------------------------------

    def status(self) -> Status:
        """Done, resumable from a step, or new; refuses a folder made with another recipe or holding other files."""
        out = self.opts.out
        record = folder.read_record(out) if out.is_dir() else None
        if record is None:
            if out.is_dir() and any(out.iterdir()):
                raise AdapterError(f"{out} is not empty and holds no fine-tuning record; choose a new or empty "
                                   "folder")
            return Status(False, 0)
        if record["recipe"] != self.recipe:
            if not self.opts.overwrite:
                changed = sorted(k for k in {**record["recipe"], **self.recipe}
                                 if record["recipe"].get(k) != self.recipe.get(k))
                raise AdapterError(f"{out} holds a fine-tuning run with a different recipe ({', '.join(changed)}); "
                                   "use another --out, or --overwrite to replace it")
            self._clear()
            return Status(False, 0)
        if record.get("complete"):
            return Status(True, self.total_steps)
        steps = folder.saved_steps(out)
        return Status(False, steps[-1] if steps else 0)

    def _clear(self) -> None:
        out = self.opts.out
        for path in [*out.glob("checkpoint-*"), *out.glob(".*.tmp")]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for name in (*folder.ADAPTER_FILES, folder.RECORD):
            (out / name).unlink(missing_ok=True)

    def checkpoint_steps(self) -> list[int]:
        return folder.saved_steps(self.opts.out)

    def batch(self, step: int) -> np.ndarray:
        """The question indices of one optimizer step: a slice of its epoch's seeded permutation."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.hyper.seed, epoch]).permutation(len(self.questions))
        return order[index * self.hyper.batch_size : (index + 1) * self.hyper.batch_size]

    # -- training -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train (or resume) to the end; returns the final record. The out folder is locked meanwhile."""
        self.opts.out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(self.opts.out, f"fine-tuning folder {self.opts.out}")
        try:
            status = self.status()
            if status.done:
                log.info("%s: training finished earlier, nothing to do", self.opts.out)
                return folder.read_record(self.opts.out)
            return self._train(status.start_step)
        finally:
            lock.release()

    def _train(self, start_step: int) -> dict[str, Any]:
        started = time.perf_counter()
        loaded = load_model(self.source, self.device, self.dtype)
        targets = self._targets(loaded)
        accuracy_before = self.accuracy(loaded) if start_step == 0 else folder.read_record(self.opts.out)[
            "accuracy"]["train_before"]
        model, master, optimizer, scheduler = self._trainable(loaded.model)
        losses: list[float] = []
        if start_step:
            losses = self._resume(master, optimizer, scheduler, start_step)
            log.info("resuming from checkpoint-%d", start_step)
        else:
            folder.write_json_atomic(self.opts.out / folder.RECORD, self._record(
                model, 0, [], complete=False, accuracy={"train_before": accuracy_before}))
        model.train()
        loop_started = time.perf_counter()
        with tqdm(total=self.total_steps, initial=start_step, unit="step", desc=f"finetune {self.source.model_id}",
                  mininterval=1.0) as bar:
            for step in range(start_step, self.total_steps):
                losses.append(self._step(model, loaded.tokenizer, master, optimizer, scheduler, self.batch(step),
                                         targets))
                bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=step // self.steps_per_epoch + 1)
                bar.update(1)
                done = step + 1
                if done % self.opts.save_every == 0 and done < self.total_steps:
                    self._save_checkpoint(model, master, optimizer, scheduler, done, losses)
        train_seconds = time.perf_counter() - loop_started
        tmp = self.opts.out / ".final.tmp"
        model.save_pretrained(tmp, state_dict=master.state_dict())
        record = self._record(model, self.total_steps, losses, complete=True)
        # merged, the adapter costs nothing at inference (unmerged LoRA layers are slow on a CPU)
        merged = replace(loaded, model=model.merge_and_unload().eval())
        record["accuracy"] = {"train_before": accuracy_before, "train_after": self.accuracy(merged)}
        record["seconds"] = {"total": time.perf_counter() - started, "training_steps": train_seconds,
                             "resumed_at_step": start_step}
        record["adapter"]["fingerprint"] = folder.fingerprint(tmp)
        folder.publish_files(tmp, self.opts.out, record)
        return record

    def _targets(self, loaded: LoadedModel) -> torch.Tensor:
        ids = letter_token_ids(loaded.tokenizer)
        return torch.tensor([ids[LETTERS.index(q.answer)] for q in self.questions], device=self.device)

    def _trainable(self, base: torch.nn.Module) -> tuple[PeftModel, MasterWeights, torch.optim.Optimizer, Any]:
        """The base model with fresh LoRA layers in its dtype, their float32 masters, optimizer and schedule.
        On a CPU, attention runs eagerly (faster than SDPA's backward on short prompts, measured here) and
        the LoRA dropout draws from a numpy generator (``self.dropout_rng``)."""
        h = self.hyper
        torch.manual_seed(h.seed)
        if self.device.type == "cpu":
            base.set_attn_implementation("eager")
        modules = h.target_modules if h.target_modules == "all-linear" else h.target_modules.split(",")
        config = LoraConfig(r=h.rank, lora_alpha=h.alpha, lora_dropout=h.dropout, target_modules=modules,
                            task_type="CAUSAL_LM")
        with peft_quietly():
            model = get_peft_model(base, config, autocast_adapter_dtype=False)
        if self.device.type == "cpu":
            use_fast_dropout(model, self.dropout_rng)
        master = MasterWeights(model)
        optimizer = torch.optim.AdamW(master.parameters, lr=h.learning_rate, weight_decay=h.weight_decay)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=math.ceil(h.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps, min_lr_rate=h.min_lr_ratio)
        return model, master, optimizer, scheduler

    def _step(self, model: PeftModel, tokenizer, master: MasterWeights, optimizer: torch.optim.Optimizer,
              scheduler, batch: np.ndarray, targets: torch.Tensor) -> float:
        """One optimizer step over ``batch``: the weighted mean of its letter losses, in micro-batches of
        questions of similar length (little padding)."""
        master.zero_grad()
        batch = batch[np.argsort([len(self.prompts[i]) for i in batch], kind="stable")]
        total = 0.0
        for start in range(0, len(batch), self.opts.micro_batch):
            part = batch[start : start + self.opts.micro_batch]
            inputs = encode(tokenizer, [self.prompts[i] for i in part], self.device, self.hyper.max_length)
            losses = letter_losses(model, inputs, targets[part])
            loss = (losses * self.weights[part].to(losses.device)).sum() / len(batch)
            loss.backward()
            master.collect_grads()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(master.parameters, self.hyper.max_grad_norm)
        optimizer.step()
        scheduler.step()
        master.push()
        return total

    def accuracy(self, loaded: LoadedModel) -> float:
        """Share of the training questions whose predicted letter (argmax over A-D) is the answer."""
        extractor = StateExtractor(loaded, "residual")
        answers = np.array([q.answer for q in self.questions])
        correct = 0
        for start in range(0, len(self.prompts), self.opts.micro_batch):
            _, predicted = extractor(self.prompts[start : start + self.opts.micro_batch])
            correct += int((predicted == answers[start : start + self.opts.micro_batch]).sum())
        return correct / len(self.prompts)

    # -- checkpoints and records ----------------------------------------------------------------

    def _save_checkpoint(self, model: PeftModel, master: MasterWeights, optimizer: torch.optim.Optimizer,
                         scheduler, step: int, losses: list[float]) -> None:
        """The adapter and everything needed to go on from ``step``, published in one rename."""
        tmp = self.opts.out / f".checkpoint-{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, state_dict=master.state_dict())
        state = {"master": master.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": step, "losses": losses,
                 "dropout_rng": json.dumps(self.dropout_rng.bit_generator.state)}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(state, tmp / folder.TRAINING_STATE)
        record = self._record(model, step, losses, complete=True)
        record["adapter"]["fingerprint"] = folder.fingerprint(tmp)
        folder.write_json_atomic(tmp / folder.RECORD, record)
        folder.publish_folder(tmp, folder.checkpoint_dir(self.opts.out, step))

    def _resume(self, master: MasterWeights, optimizer: torch.optim.Optimizer, scheduler, step: int) -> list[float]:
        path = folder.checkpoint_dir(self.opts.out, step)
        state = torch.load(path / folder.TRAINING_STATE, map_location=self.device, weights_only=True)
        master.load_state_dict(state["master"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        self.dropout_rng.bit_generator.state = json.loads(state["dropout_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        return list(state["losses"])

    def _record(self, model: PeftModel, step: int, losses: list[float], complete: bool,
                accuracy: dict[str, float] | None = None) -> dict[str, Any]:
        """What a probe of this adapter records as its provenance: recipe, base, training ids, losses."""
        last_epoch = losses[-self.steps_per_epoch :]
        return {
            "format": folder.FORMAT,
            "complete": complete,
            "recipe": self.recipe,
            "base_location": self.source.location,
            "training": {"split": self.selection.train_split, "ids": [q.id for q in self.questions],
                         "n_questions": len(self.questions)},
            "step": step,
            "total_steps": self.total_steps,
            "epoch": step / self.steps_per_epoch,
            "losses": losses,
            "final_loss": float(np.mean(last_epoch)) if last_epoch else None,  # mean over the last epoch's steps
            "accuracy": accuracy or {},
            "adapter": {"target_modules": sorted(model.peft_config["default"].target_modules),
                        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)},
            "micro_batch": self.opts.micro_batch,
            "device": str(self.device),
            "versions": versions(),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": {},  # the final record's: total (loading and accuracy included) and the steps alone
        }

    # -- estimate -------------------------------------------------------------------------------

    def estimate(self) -> dict[str, Any]:
        """What ``--dry-run`` prints, from one timed step on questions of median length; writes nothing."""
        loaded = load_model(self.source, self.device, self.dtype)
        targets = self._targets(loaded)
        model, master, optimizer, scheduler = self._trainable(loaded.model)
        model.train()
        order = np.argsort([len(p) for p in self.prompts], kind="stable")
        middle = len(order) // 2
        batch = order[max(0, middle - self.hyper.batch_size // 2) :][: self.hyper.batch_size]
        self._step(model, loaded.tokenizer, master, optimizer, scheduler, batch[:1], targets)  # warm-up
        started = time.perf_counter()
        self._step(model, loaded.tokenizer, master, optimizer, scheduler, batch, targets)
        per_question = (time.perf_counter() - started) / len(batch)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"questions": len(self.questions), "subjects": len(self.recipe["subjects"]),
                "steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "seconds": per_question * len(self.questions) * self.hyper.epochs,
                "trainable_parameters": trainable, "peak_memory_bytes": peak,
                "compute_dtype": self.recipe["compute_dtype"], "device": str(self.device)}
