"""Lint (ruff) and type-check (mypy) as part of the test suite, with the settings in
pyproject.toml. mypy checks the package as it is installed: a tree of links under the one
import name `universal_neurons`, as setuptools' package-dir mapping lays it out."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"": "universal", "activations": "activations", "cli": "cli"}  # sub-package -> folder


def _tool(name: str) -> list[str]:
    if shutil.which(name, path=os.path.dirname(sys.executable)) is None:
        pytest.fail(f"{name} is not installed; install the test extras: pip install -e '.[test]'")
    return [sys.executable, "-m", name]


def test_ruff():
    got = subprocess.run([*_tool("ruff"), "check", "--no-cache", "activations", "cli", "universal", "tests",
                          "benchmarks", "scripts"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stdout + got.stderr


def _link_tree(root: Path) -> Path:
    """`root/universal_neurons/` with a link per file of universal/ and one per sub-package folder."""
    pkg = root / "universal_neurons"
    pkg.mkdir()
    for sub, folder in FOLDERS.items():
        src = ROOT / folder
        if sub:
            (pkg / sub).symlink_to(src, target_is_directory=True)
            continue
        for item in src.iterdir():
            if item.name != "__pycache__":
                (pkg / item.name).symlink_to(item, target_is_directory=item.is_dir())
    return pkg


def test_mypy(tmp_path):
    _link_tree(tmp_path)
    got = subprocess.run([*_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"),
                          "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "universal_neurons"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert got.returncode == 0, got.stdout[-6000:] + got.stderr[-2000:]
