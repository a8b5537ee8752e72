"""The adapter folder that `actstore finetune` writes and ingest probes: the final adapter, ``checkpoint-STEP/``
adapters and their records. Below both finetune and ingest, which each import it.

Layout of ``--out DIR``::

    adapter_config.json, adapter_model.safetensors   the final adapter (peft's own files)
    actstore-finetune.json                           its record; "complete": true only once training ended
    checkpoint-STEP/                                 an adapter, its record and the training state to resume

A checkpoint is written into a hidden temporary folder and renamed into place, so it appears whole or
not at all. The final adapter's files are moved in first and its record, written last by an atomic
replace, marks it complete. Readers (ingest) accept an adapter only when its record is complete and
the adapter files still have the fingerprint the record names: a kill at any moment never leaves
something half-written that could be probed.

Importable without torch: ingest's planning and ``actstore ls``-like tools read records only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

RECORD = "actstore-finetune.json"
TRAINING_STATE = "training_state.pt"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FORMAT = "actstore-finetune-v1"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class AdapterError(ValueError):
    """A fine-tuning folder is missing, unfinished, altered or made with another recipe."""


def is_adapter(folder: Path | str) -> bool:
    """A peft adapter folder, or an ``actstore finetune`` folder whose training has not finished yet."""
    return (Path(folder) / "adapter_config.json").is_file() or (Path(folder) / RECORD).is_file()


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step}"


def fingerprint(folder: Path) -> str:
    """sha256 of the adapter's own files (not the record, which holds times and losses)."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(name.encode() + b"\0")
        with (folder / name).open("rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: unreadable fine-tuning record ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise AdapterError(f"{path}: not an actstore fine-tuning record")
    return record


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    """Write, flush to disk, then rename over ``path``: readers see the old file or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place in one rename (replacing an older one of the same name)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def publish_files(tmp: Path, out: Path, record: dict[str, Any]) -> None:
    """Move the adapter files from ``tmp`` into ``out``, then write the record that marks them complete."""
    for name in ADAPTER_FILES:
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp)
    write_json_atomic(out / RECORD, record)


def saved_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints in ``out``, ascending (half-written ones are hidden .tmp folders)."""
    steps = [int(m[1]) for p in out.glob("checkpoint-*") if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    return sorted(s for s in steps if (checkpoint_dir(out, s) / RECORD).is_file())


def finished_adapter(folder: Path) -> dict[str, Any]:
    """The record of a complete, unaltered adapter in ``folder``; AdapterError saying what is wrong otherwise."""
    record = read_record(folder)
    if record is None:
        raise AdapterError(f"{folder} has no {RECORD}: not an adapter written by actstore finetune")
    if not record.get("complete"):
        raise AdapterError(
            f"{folder}: training has not finished; rerun the same actstore finetune command to resume it"
        )
    if (
        not all((folder / name).is_file() for name in ADAPTER_FILES)
        or fingerprint(folder) != record["adapter"]["fingerprint"]
    ):
        raise AdapterError(f"{folder}: the adapter files differ from those its record names (altered or half-copied)")
    return record
