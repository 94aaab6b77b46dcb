"""The distribution as a user installs it: a wheel whose only top-level name is
`universal_neurons` (no generic `cli` or `activations` in site-packages), with its data
files, installed into a fresh environment where the import, `--version`, `--help` and
`python -m universal_neurons` work without torch (the package's imports are lazy)."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    got = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr
    (whl,) = out.glob("universal_neurons-*.whl")
    return whl


def test_wheel_has_one_project_unique_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"universal_neurons"}
    for need in ("universal_neurons/py.typed", "universal_neurons/activations/models.py",
                 "universal_neurons/cli/main.py", "universal_neurons/correlation/__init__.py",
                 "universal_neurons/data/demo_tokenizer.json"):
        assert need in names, need


def test_fresh_environment_imports_and_answers_without_torch(wheel, tmp_path):
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env)
    py = env / "bin" / "python"
    got = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert not any((Path(site) / name).exists() for name in ("cli", "activations", "universal"))
    version = subprocess.run([str(py), "-c", "import universal_neurons as u; print(u.__version__)"],
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == subprocess.run(
        [sys.executable, "-c", "import universal_neurons as u; print(u.__version__)"],
        capture_output=True, text=True, check=True).stdout.strip()
    cli = env / "bin" / "universal-neurons"
    got = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and got.stdout.strip() == f"universal-neurons {version.stdout.strip()}", got.stderr
    got = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and "correlate" in got.stdout, got.stderr  # torch is not even installed here
    got = subprocess.run([str(py), "-m", "universal_neurons", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0 and "universal-neurons" in got.stdout, got.stderr
