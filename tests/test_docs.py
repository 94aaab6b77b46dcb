"""The repository stands alone: every file it names exists in it, and nothing points outside it.

Checked in every tracked text file (code, docs, notebooks, scripts): Markdown links to local
files, `docs/<name>.md` references, and mentions of files that live only outside the project.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".sh", ".txt", ".cfg"}
OUTSIDE = re.compile(r"\b(METHOD|STYLE|OFFLINE)\.md\b|\.\./shared/")
DOC_REF = re.compile(r"\bdocs/([\w.-]+\.md)\b")
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / f for f in out if Path(f).suffix in TEXT_SUFFIXES and (ROOT / f).is_file()
            and not f.startswith("tests/data/")]


def test_no_file_names_a_file_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in _tracked() if p.name != "test_docs.py"
           for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not bad, f"these lines cite files outside the repository: {bad}"


def test_every_named_doc_and_local_link_exists():
    missing = []
    for p in _tracked():
        text = p.read_text(errors="replace")
        for name in DOC_REF.findall(text):
            if not (ROOT / "docs" / name).exists():
                missing.append(f"{p.relative_to(ROOT)} names docs/{name}")
        if p.suffix == ".md":
            for target in MD_LINK.findall(text):
                if "://" in target or target.startswith("mailto:"):
                    continue
                if not (p.parent / target).exists():
                    missing.append(f"{p.relative_to(ROOT)} links {target}")
    assert not missing, missing
