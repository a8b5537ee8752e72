"""The documentation as a newcomer meets it: a short README that shows using actstore first, and no link,
file or command reference that leads nowhere."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
# repository paths named in prose or code: `bench/load.py`, tests/test_objectstore*.py, ...
NAMED_PATH = re.compile(r"(?<![\w./-])((?:actstore|bench|tests|proto|docs)/[\w*./-]+\.(?:py|proto|md|png|toml|pyi))")


def _local_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_readme_is_an_entrance():
    text = README.read_text()
    assert len(text) <= 12_000, f"README.md has {len(text)} characters; move detail to docs/"
    first = "\n".join(text.splitlines()[:80])
    assert "actstore ingest --store" in first, "an ingest command belongs in README's first 80 lines"
    assert "Client(" in first and "hidden_states(" in first, "a client read belongs in README's first 80 lines"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_somewhere(page: Path):
    missing = [t for t in _local_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def _sources() -> list[Path]:
    code = [p for p in sorted((ROOT / "actstore").rglob("*.py")) if "v1" not in p.parts]  # v1: generated
    return [README, *DOCS, *code, *sorted((ROOT / "bench").glob("*.py")), ROOT / "tasks.py", ROOT / "pyproject.toml"]


def test_every_named_file_exists():
    missing = {}
    for source in _sources():
        for named in NAMED_PATH.findall(source.read_text()):
            if not list(ROOT.glob(named)):
                missing.setdefault(str(source.relative_to(ROOT)), []).append(named)
    assert not missing, f"files named but absent: {missing}"


def test_nothing_cites_a_file_outside_the_repository():
    citing = [str(s.relative_to(ROOT)) for s in _sources() if "REFERENCE.md" in s.read_text()]
    assert not citing, f"REFERENCE.md is not in the repository, yet cited by {citing}"


def test_cli_reference_is_generated_from_the_parser():
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "docs" / "generate_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.TARGET.read_text() == module.render(), (
        "docs/reference/cli.md is stale: run .venv/bin/python docs/generate_cli.py"
    )


def test_docs_site_builds_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
