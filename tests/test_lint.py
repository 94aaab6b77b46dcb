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


def test_no_private_name_is_imported_across_modules():
    """What modules share is public in its module; a leading underscore stays inside its file."""
    import ast

    bad = []
    for folder in FOLDERS.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                ours = node.level > 0 or (node.module or "").startswith("universal_neurons")
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if ours and private:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {private} from {node.module}")
                if ours and any(part.startswith("_") and not part.startswith("__")
                                for part in (node.module or "").split(".")):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports from private module {node.module}")
    assert not bad, bad


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for folder in FOLDERS.values() for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules by job: {long}"
