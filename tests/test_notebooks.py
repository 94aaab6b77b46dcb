"""The worked examples in notebooks/ execute from top to bottom on the tiny demo family
(UNIVERSAL_NEURONS_DEMO=tiny), in order, sharing one temporary cache and output directory so
the family is trained once. Set UNIVERSAL_NEURONS_NOTEBOOK_CACHE to a directory to keep the
trained family between test sessions."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    # conftest gives the session one temporary cache, where test_demo already trained the tiny family
    cache = os.environ.get("UNIVERSAL_NEURONS_NOTEBOOK_CACHE") or os.environ["XDG_CACHE_HOME"]
    env = {"UNIVERSAL_NEURONS_DEMO": "tiny", "XDG_CACHE_HOME": cache, "UNIVERSAL_NEURONS_OUT": str(root / "out"),
           "UNIVERSAL_NEURONS_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    yield root / "out"
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_there_are_five_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_properties", "03_ablation", "04_persistence",
                                           "05_explain"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, notebook_env):
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    # the first cell of the first notebook trains the tiny family: generous per-cell limit
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
    assert (notebook_env / "notebooks" / "report.html").is_file()
