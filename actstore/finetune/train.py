"""Training a LoRA adapter on the authors' training prompt, the loss on the answer letter alone, with the
held-out accuracy measured at every checkpoint.

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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from actstore import adapter as folder
from actstore.adapter import AdapterError
from actstore.finetune.options import FinetuneOptions, checkpoint_schedule, lr_factor
from actstore.finetune.precision import MasterWeights, use_fast_dropout
from actstore.ingest.datasets import LETTERS, DatasetError, Question, load_dataset
from actstore.ingest.extract import encode, letter_token_ids
from actstore.ingest.model import LoadedModel, ModelSource, load_model, peft_quietly, resolve_device, resolve_dtype
from actstore.ingest.pipeline import versions
from actstore.ingest.prompts import PROMPT_FORMAT, build_prompt, question_block
from actstore.ingest.selection import Selection, select, share_out, split_train_eval, train_source
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


def training_prompt(question: Question, subject_header: bool) -> str:
    """The authors' training prompt: the question, its options and ``Answer:`` (the letter is the target),
    without the subject header that probes carry, unless asked for."""
    return build_prompt(question, [], None) if subject_header else question_block(question)


def prompt_description(subject_header: bool) -> str:
    if subject_header:
        return f"{PROMPT_FORMAT}, 0-shot: the subject header, the question, its options, 'Answer:' and the letter"
    return (
        "the question, its options, 'Answer:' and the letter, without the subject header (the authors' training "
        "prompt; probes carry the header)"
    )


def _limited(questions: list[Question], limit: int | None) -> list[Question]:
    """At most ``limit`` questions, spread across subjects as evenly as their sizes allow."""
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    counts = share_out({s: len(qs) for s, qs in by_subject.items()}, limit)
    return [q for s in sorted(by_subject) for q in by_subject[s][: counts[s]]]


@torch.inference_mode()
def predicted_letters(
    model: torch.nn.Module, tokenizer, prompts: list[str], device: torch.device, max_length: int, batch_size: int
) -> np.ndarray:
    """The argmax letter (A-D) after each prompt, from the model as it stands (unmerged adapter included)."""
    ids = letter_token_ids(tokenizer)
    found = []
    for start in range(0, len(prompts), batch_size):
        inputs = encode(tokenizer, prompts[start : start + batch_size], device, max_length)
        last = model.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, -1]
        found.append(model.get_output_embeddings()(last)[:, ids].argmax(-1).cpu().numpy())
    return np.asarray(LETTERS)[np.concatenate(found)] if found else np.array([], dtype=str)


MICRO_BATCH_CHARS = 4096  # padded prompt characters per forward/backward pass (~1,000 tokens)


def micro_batches(batch: np.ndarray, lengths: list[int], most: int) -> Iterator[np.ndarray]:
    """``batch`` sorted by prompt length and cut into runs of at most ``most`` questions whose padded length
    (count x the longest) stays within MICRO_BATCH_CHARS, a long prompt alone. Eager attention keeps every
    head's weights for the backward pass, so eight prompts padded to one of ~1,000 tokens held ~9 GB and
    took minutes a step on a CPU; the gradient is the same sum however the batch is cut."""
    order = batch[np.argsort([lengths[i] for i in batch], kind="stable")]
    start = 0
    while start < len(order):
        stop = start + 1
        while (
            stop < len(order) and stop - start < most and (stop - start + 1) * lengths[order[stop]] <= MICRO_BATCH_CHARS
        ):
            stop += 1
        yield order[start:stop]
        start = stop


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
        self.selection: Selection = select(self.dataset, opts.subjects, train_pool=opts.train_pool)
        train, self.held_out = split_train_eval(self.selection.train, opts.eval_per_subject)
        self.questions = _limited(train, opts.limit)
        if not self.questions:
            raise DatasetError(
                f"no training questions in {self.dataset.name} ({self.selection.train_split} split, "
                f"--train-pool {opts.train_pool}, of which {opts.eval_per_subject} per subject held out "
                "for accuracy)"
            )
        if opts.stop_accuracy is not None and not self.held_out:
            raise DatasetError("--stop-accuracy needs held-out questions to measure: --eval-per-subject is 0")
        self.device = resolve_device(opts.device)
        self.dtype = resolve_dtype(opts.dtype, self.device)
        self.steps_per_epoch = math.ceil(len(self.questions) / self.hyper.batch_size)
        self.total_steps = self.steps_per_epoch * self.hyper.epochs
        self.schedule = checkpoint_schedule(self.total_steps, self.steps_per_epoch, opts.checkpoints, opts.save_every)
        header = self.hyper.subject_header
        self.prompts = [training_prompt(q, header) for q in self.questions]
        self.held_out_prompts = [training_prompt(q, header) for q in self.held_out]
        self.weights = torch.tensor(subject_weights(self.questions), dtype=torch.float32)
        self.dropout_rng = np.random.default_rng([self.hyper.seed, 1])
        self.recipe = self._recipe()

    def _recipe(self) -> dict[str, Any]:
        """Everything that decides the adapter's weights, in words and numbers (the checkpoint schedule does not)."""
        h, opts = self.hyper, self.opts
        return {
            "base": {"model_id": self.source.model_id, "fingerprint": self.source.fingerprint()},
            "dataset": {"name": self.dataset.name, "sha256": self.dataset.sha256},
            "training_questions": train_source(self.selection, opts.train_pool)
            + (
                f"; the last {opts.eval_per_subject} of each subject's pool measure held-out accuracy instead"
                if opts.eval_per_subject
                else ""
            )
            + (f"; at most {opts.limit} in all" if opts.limit else ""),
            "subjects": sorted({q.subject for q in self.questions}),
            "prompt_format": prompt_description(h.subject_header),
            "target": "the answer letter's token after 'Answer:'; no other position is a target",
            "weighting": "inverse subject size over each batch of 16 (the paper's text; the authors' code normalises "
            "the weights within micro-batches of one question, which cancels them)",
            "optimizer": "AdamW",
            "schedule": f"linear warm-up over {h.warmup_steps(self.total_steps)} steps from min_lr_ratio x the rate "
            "(int(warmup_ratio x steps), at most max_warmup_steps), then cosine down to min_lr_ratio x "
            "the rate (the authors')",
            "clipping": f"global gradient norm clipped at {h.max_grad_norm}"
            if h.max_grad_norm > 0
            else "none (the authors')",
            "stop_accuracy": opts.stop_accuracy,
            "hyperparameters": h.as_dict(),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
        }

    # -- what is there --------------------------------------------------------------------------

    def status(self) -> Status:
        """Done, resumable from a step, or new; refuses a folder made with another recipe or holding other files."""
        out = self.opts.out
        record = folder.read_record(out) if out.is_dir() else None
        if record is None:
            if out.is_dir() and any(out.iterdir()):
                raise AdapterError(f"{out} is not empty and holds no fine-tuning record; choose a new or empty folder")
            return Status(False, 0)
        if record["recipe"] != self.recipe:
            if not self.opts.overwrite:
                changed = sorted(
                    k for k in {**record["recipe"], **self.recipe} if record["recipe"].get(k) != self.recipe.get(k)
                )
                raise AdapterError(
                    f"{out} holds a fine-tuning run with a different recipe ({', '.join(changed)}); "
                    "use another --out, or --overwrite to replace it"
                )
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
        model, master, optimizer, scheduler = self._trainable(loaded.model)
        losses: list[float] = []
        if start_step:
            losses, held_out = self._resume(master, optimizer, scheduler, start_step)
            log.info("resuming from checkpoint-%d", start_step)
        else:
            held_out = [[0, self.held_out_accuracy(model, loaded.tokenizer)]]  # the base: LoRA B starts at zero
            folder.write_json_atomic(self.opts.out / folder.RECORD, self._record(model, 0, [], False, held_out))
        model.train()
        loop_started = time.perf_counter()
        step = start_step
        with tqdm(
            total=self.total_steps,
            initial=start_step,
            unit="step",
            desc=f"finetune {self.source.model_id}",
            mininterval=1.0,
        ) as bar:
            while step < self.total_steps and not self._reached(held_out):
                losses.append(
                    self._step(model, loaded.tokenizer, master, optimizer, scheduler, self.batch(step), targets)
                )
                step += 1
                bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=(step - 1) // self.steps_per_epoch + 1)
                bar.update(1)
                if step in self.schedule:
                    held_out.append([step, self.held_out_accuracy(model, loaded.tokenizer)])
                    self._save_checkpoint(model, master, optimizer, scheduler, step, losses, held_out)
        train_seconds = time.perf_counter() - loop_started
        if held_out[-1][0] != step:
            held_out.append([step, self.held_out_accuracy(model, loaded.tokenizer)])
        tmp = self.opts.out / ".final.tmp"
        model.save_pretrained(tmp, state_dict=master.state_dict())
        record = self._record(model, step, losses, True, held_out)
        record["stopped_early"] = step < self.total_steps  # at stop_accuracy
        record["seconds"] = {
            "total": time.perf_counter() - started,
            "training_steps": train_seconds,
            "resumed_at_step": start_step,
        }
        record["adapter"]["fingerprint"] = folder.fingerprint(tmp)
        folder.publish_files(tmp, self.opts.out, record)
        return record

    def _reached(self, held_out: list[list]) -> bool:
        """Whether the last measured held-out accuracy reached ``stop_accuracy`` (never at step 0: the base)."""
        stop = self.opts.stop_accuracy
        step, value = held_out[-1]
        return stop is not None and step > 0 and value is not None and value >= stop

    def held_out_accuracy(self, model: torch.nn.Module, tokenizer) -> float | None:
        """Share of the held-out questions (neither trained on nor probed) answered right by the model as it
        stands: the base with the LoRA branch beside it in the compute dtype, dropout off, as probes run it."""
        if not self.held_out:
            return None
        was_training = model.training
        model.eval()
        predicted = predicted_letters(
            model, tokenizer, self.held_out_prompts, self.device, self.hyper.max_length, self.opts.micro_batch
        )
        model.train(was_training)
        return float(np.mean(predicted == np.array([q.answer for q in self.held_out])))

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
        config = LoraConfig(
            r=h.rank, lora_alpha=h.alpha, lora_dropout=h.dropout, target_modules=modules, task_type="CAUSAL_LM"
        )
        with peft_quietly():
            model = get_peft_model(base, config, autocast_adapter_dtype=False)
        if self.device.type == "cpu":
            use_fast_dropout(model, self.dropout_rng)
        master = MasterWeights(model)
        optimizer = torch.optim.AdamW(master.parameters, lr=h.learning_rate, weight_decay=h.weight_decay)
        warmup, total = h.warmup_steps(self.total_steps), self.total_steps
        scheduler = LambdaLR(optimizer, lambda step: float(lr_factor(step, total, warmup, h.min_lr_ratio)))
        return model, master, optimizer, scheduler

    def _step(
        self,
        model: PeftModel,
        tokenizer,
        master: MasterWeights,
        optimizer: torch.optim.Optimizer,
        scheduler,
        batch: np.ndarray,
        targets: torch.Tensor,
    ) -> float:
        """One optimizer step over ``batch``: the weighted mean of its letter losses, in micro-batches of
        questions of similar length (little padding; see ``micro_batches``)."""
        master.zero_grad()
        total = 0.0
        for part in micro_batches(batch, [len(p) for p in self.prompts], self.opts.micro_batch):
            inputs = encode(tokenizer, [self.prompts[i] for i in part], self.device, self.hyper.max_length)
            losses = letter_losses(model, inputs, targets[part])
            loss = (losses * self.weights[part].to(losses.device)).sum() / len(batch)
            loss.backward()
            master.collect_grads()
            total += loss.item()
        if self.hyper.max_grad_norm > 0:  # the authors clip nothing
            torch.nn.utils.clip_grad_norm_(master.parameters, self.hyper.max_grad_norm)
        optimizer.step()
        scheduler.step()
        master.push()
        return total

    # -- checkpoints and records ----------------------------------------------------------------

    def _save_checkpoint(
        self,
        model: PeftModel,
        master: MasterWeights,
        optimizer: torch.optim.Optimizer,
        scheduler,
        step: int,
        losses: list[float],
        held_out: list[list],
    ) -> None:
        """The adapter and everything needed to go on from ``step``, published in one rename."""
        tmp = self.opts.out / f".checkpoint-{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, state_dict=master.state_dict())
        state = {
            "master": master.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": step,
            "losses": losses,
            "dropout_rng": json.dumps(self.dropout_rng.bit_generator.state),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(state, tmp / folder.TRAINING_STATE)
        record = self._record(model, step, losses, True, held_out)
        record["adapter"]["fingerprint"] = folder.fingerprint(tmp)
        folder.write_json_atomic(tmp / folder.RECORD, record)
        folder.publish_folder(tmp, folder.checkpoint_dir(self.opts.out, step))

    def _resume(
        self, master: MasterWeights, optimizer: torch.optim.Optimizer, scheduler, step: int
    ) -> tuple[list[float], list[list]]:
        """Losses and held-out accuracies so far, with every state restored from ``checkpoint-step``."""
        path = folder.checkpoint_dir(self.opts.out, step)
        state = torch.load(path / folder.TRAINING_STATE, map_location=self.device, weights_only=True)
        master.load_state_dict(state["master"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        self.dropout_rng.bit_generator.state = json.loads(state["dropout_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        return list(state["losses"]), folder.read_record(path)["accuracy"]["held_out"]

    def _record(
        self, model: PeftModel, step: int, losses: list[float], complete: bool, held_out: list[list]
    ) -> dict[str, Any]:
        """What a probe of this adapter records as its provenance: recipe, base, training ids, losses, the
        checkpoint schedule and the held-out accuracy at every checkpoint so far."""
        last_epoch = losses[-self.steps_per_epoch :]
        return {
            "format": folder.FORMAT,
            "complete": complete,
            "recipe": self.recipe,
            "base_location": self.source.location,
            "training": {
                "split": self.selection.train_split,
                "ids": [q.id for q in self.questions],
                "n_questions": len(self.questions),
                "held_out_ids": [q.id for q in self.held_out],
            },
            "step": step,
            "total_steps": self.total_steps,
            "checkpoints": {
                "steps": self.schedule,
                "final": self.total_steps,
                "rule": f"every {self.opts.save_every} steps"
                if self.opts.save_every
                else f"np.unique(np.around(np.geomspace(1, {self.total_steps}, {self.opts.checkpoints}, "
                "endpoint=False))) (the authors'), plus the end of every epoch",
            },
            "epoch": step / self.steps_per_epoch,
            "losses": losses,
            "final_loss": float(np.mean(last_epoch)) if last_epoch else None,  # mean over the last epoch's steps
            "accuracy": {
                "held_out": held_out,
                "before": held_out[0][1],
                "after": held_out[-1][1],
                "n_held_out": len(self.held_out),
                "measured": "held-out questions (neither trained on nor probed), training prompt, adapter "
                "unmerged beside the base in the compute dtype",
            },
            "adapter": {
                "target_modules": sorted(model.peft_config["default"].target_modules),
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            },
            "micro_batch": self.opts.micro_batch,
            "device": str(self.device),
            "versions": versions(),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
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
        return {
            "questions": len(self.questions),
            "subjects": len(self.recipe["subjects"]),
            "steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "seconds": per_question * len(self.questions) * self.hyper.epochs,
            "trainable_parameters": trainable,
            "peak_memory_bytes": peak,
            "compute_dtype": self.recipe["compute_dtype"],
            "device": str(self.device),
        }
