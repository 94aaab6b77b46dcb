"""Bad inputs and faults against the command line, as a new user would make them.

Every case asserts the exit code, that the error is one line naming the problem (no
traceback), and that no input or earlier output changed (checksums of every file in the
working folder before and after). Disk-full cases run the CLI in a subprocess under a file
size limit (`prlimit --fsize`): the previous result stays intact, nothing half-written is left
at the final path, and the rerun without the limit succeeds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_TEXT
from universal_neurons.cli.main import main as cli

TOKEN_ARGS = ["--ctx-len", "32"]


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tiny_family, tmp_path_factory) -> Path:
    """A working folder with text, a token set, two stores, a correlation result and a table."""
    root = tmp_path_factory.mktemp("made")
    (root / "text.txt").write_text(SAMPLE_TEXT * 4)
    assert cli(["tokenize", str(root / "text.txt"), "--model", str(tiny_family[0]), "-o", str(root / "tokens.h5"),
                *TOKEN_ARGS]) == 0
    for label, model in zip("ab", tiny_family):
        assert cli(["cache", str(model), "--tokens", str(root / "tokens.h5"), "-o", str(root / f"{label}.h5")]) == 0
    assert cli(["correlate", str(root / "a.h5"), str(root / "b.h5"), "-o", str(root / "corr.h5")]) == 0
    assert cli(["flag", str(root / "corr.h5"), "-o", str(root / "table.csv")]) == 0
    assert cli(["run", *map(str, tiny_family), "--text", str(root / "text.txt"), "-o", str(root / "run"),
                *TOKEN_ARGS, "--batch-rows", "8", "--skip", "properties,ablation,agreement,explanations,report"]) == 0
    assert cli(["report", str(root / "run")]) == 0
    return root


@pytest.fixture()
def work(made, tmp_path) -> Path:
    """A private copy of the made folder (a case may never change it, but a bug could)."""
    dst = tmp_path / "work"
    shutil.copytree(made, dst)
    return dst


def _refused(argv: list[str], root: Path, capsys, match: str, code: int = 2) -> str:
    before = _checksums(root)
    capsys.readouterr()
    assert cli(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"universal-neurons {argv[0]}: error: "), err
    assert match in last, last
    assert _checksums(root) == before, "an input or an earlier output changed"
    return last


def test_output_equal_to_an_input_is_refused_even_with_overwrite(work, tiny_family, capsys):
    w = str(work)
    _refused(["correlate", f"{w}/a.h5", f"{w}/b.h5", "-o", f"{w}/a.h5", "--overwrite"], work, capsys,
             "is also an input")
    _refused(["cache", str(tiny_family[0]), "--tokens", f"{w}/tokens.h5", "-o", f"{w}/tokens.h5", "--overwrite"],
             work, capsys, "is also an input")
    _refused(["tokenize", f"{w}/text.txt", "--model", str(tiny_family[0]), "-o", f"{w}/text.txt", "--overwrite"],
             work, capsys, "is also an input")


def test_a_store_twice_or_the_same_model_twice_is_refused(work, capsys):
    w = str(work)
    _refused(["correlate", f"{w}/a.h5", f"{w}/a.h5", "-o", f"{w}/x.h5"], work, capsys, "given twice")
    shutil.copy(work / "a.h5", work / "a_copy.h5")
    _refused(["correlate", f"{w}/a.h5", f"{w}/a_copy.h5", "-o", f"{w}/x.h5"], work, capsys, "--allow-same-model")
    assert cli(["correlate", f"{w}/a.h5", f"{w}/a_copy.h5", "-o", f"{w}/x.h5", "--allow-same-model"]) == 0


@pytest.mark.parametrize("threshold", ["-0.5", "0", "1", "1.5", "nan"])
def test_thresholds_outside_zero_one_are_refused(work, capsys, threshold):
    _refused(["flag", f"{work}/corr.h5", "-o", f"{work}/t2.csv", "--threshold", threshold], work, capsys,
             "must lie in (0, 1)")


@pytest.mark.parametrize("seeds,match", [("", "at least two seeds"), ("0", "at least two seeds"),
                                         ("0,0", "repeated"), ("0,x", "comma-separated integers"),
                                         ("-1,2", "non-negative")])
def test_bad_seed_lists_are_refused_before_training(work, capsys, seeds, match):
    _refused(["train-seeds", "-o", f"{work}/fam", f"--seeds={seeds}"], work, capsys, match)
    assert not (work / "fam").exists()


def test_files_of_the_wrong_kind_give_one_line(work, tiny_family, capsys):
    w = str(work)
    _refused(["flag", f"{w}/text.txt", "-o", f"{w}/t.csv"], work, capsys, "not a readable correlation result")
    (work / "truncated.h5").write_bytes((work / "corr.h5").read_bytes()[:2000])
    _refused(["flag", f"{w}/truncated.h5", "-o", f"{w}/t.csv"], work, capsys, "not a readable correlation result")
    _refused(["flag", f"{w}/a.h5", "-o", f"{w}/t.csv"], work, capsys, "correlation result")
    _refused(["ablate", str(tiny_family[0]), "--table", f"{w}/text.txt", "--tokens", f"{w}/tokens.h5",
              "-o", f"{w}/abl"], work, capsys, "cannot tell the format")
    _refused(["cache", str(tiny_family[0]), "--tokens", f"{w}/text.txt", "-o", f"{w}/c.h5"], work, capsys,
             "token set")
    _refused(["correlate", f"{w}/tokens.h5", f"{w}/b.h5", "-o", f"{w}/x.h5"], work, capsys, "activation store")
    _refused(["report", f"{w}/nowhere"], work, capsys, "summary.json")


def test_text_that_is_not_utf8_names_the_byte_and_the_fix(work, tiny_family, capsys):
    (work / "latin1.txt").write_bytes(b"caf\xe9 au lait, " * 50)
    last = _refused(["tokenize", f"{work}/latin1.txt", "--model", str(tiny_family[0]), "-o", f"{work}/t.h5",
                     *TOKEN_ARGS], work, capsys, "not valid UTF-8: byte offset 3")
    assert "--encoding-errors replace" in last
    assert cli(["tokenize", f"{work}/latin1.txt", "--model", str(tiny_family[0]), "-o", f"{work}/t.h5",
                *TOKEN_ARGS, "--encoding-errors", "replace"]) == 0


def test_unwritable_output_folder_is_refused_before_the_work(work, capsys, monkeypatch):
    # as root (CI) a read-only folder is still writable, so the check itself is what is exercised here
    ro = work / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    _refused(["correlate", f"{work}/a.h5", f"{work}/b.h5", "-o", f"{ro}/x.h5"], work, capsys, "not writable")
    _refused(["flag", f"{work}/corr.h5", "-o", f"{ro}/t.csv"], work, capsys, "not writable")


def test_run_with_bad_settings_writes_nothing(work, tiny_family, capsys):
    out = work / "another-run"
    _refused(["run", *map(str, tiny_family), "--text", f"{work}/text.txt", "-o", str(out), "--batch-rows", "0",
              *TOKEN_ARGS], work, capsys, "batch_rows")
    _refused(["run", *map(str, tiny_family), "--text", f"{work}/text.txt", "-o", str(out), "--threshold", "2",
              *TOKEN_ARGS], work, capsys, "(0, 1)")
    _refused(["run", *map(str, tiny_family), "--text", f"{work}/text.txt", "-o", str(out), "--skip", "nothing",
              *TOKEN_ARGS], work, capsys, "--skip")
    assert not out.exists() or not any(out.iterdir())


def test_a_flipped_byte_in_a_store_is_reported_as_corruption(work, capsys):
    import h5py

    with h5py.File(work / "b.h5", "r") as f:
        ds = f["blocks.1.mlp.hook_post"]
        offset = ds.id.get_chunk_info(0).byte_offset
    data = bytearray((work / "b.h5").read_bytes())
    data[offset + 64] ^= 0x10
    (work / "b.h5").write_bytes(bytes(data))
    _refused(["correlate", f"{work}/a.h5", f"{work}/b.h5", "-o", f"{work}/x.h5"], work, capsys, "corrupted")
    assert not (work / "x.h5").exists()


# ------------------------------------------------------------------------- disk full


def _limited(argv: list[str], fsize: int) -> subprocess.CompletedProcess:
    """The CLI in a fresh process whose files may not grow past `fsize` bytes."""
    env = {**os.environ, "UNIVERSAL_NEURONS_PROGRESS": "0"}
    return subprocess.run(["prlimit", f"--fsize={fsize}", "--", sys.executable, "-m", "universal_neurons", *argv],
                           capture_output=True, text=True, timeout=300, env=env)


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp" in p.name]


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
@pytest.mark.parametrize("writer", ["correlate", "flag", "tokenize", "cache", "report"])
def test_disk_full_keeps_the_previous_result_and_the_rerun_succeeds(work, tiny_family, writer):
    w = str(work)
    argv, target = {
        "correlate": (["correlate", f"{w}/a.h5", f"{w}/b.h5", "-o", f"{w}/corr.h5", "--overwrite"], "corr.h5"),
        "flag": (["flag", f"{w}/corr.h5", "-o", f"{w}/table.csv", "--overwrite", "--threshold", "0.3"], "table.csv"),
        "tokenize": (["tokenize", f"{w}/text.txt", "--model", str(tiny_family[1]), "-o", f"{w}/tokens.h5",
                      "--overwrite", "--ctx-len", "16"], "tokens.h5"),
        "cache": (["cache", str(tiny_family[1]), "--tokens", f"{w}/tokens.h5", "-o", f"{w}/a.h5", "--overwrite",
                   "--fp32"], "a.h5"),
        "report": (["report", f"{w}/run", "--overwrite", "--title", "another title"], "run/report.html"),
    }[writer]
    before = _checksums(work)
    got = _limited(argv, fsize=4096)
    assert got.returncode == 2, got.stderr
    assert "Traceback" not in got.stderr
    last = [line for line in got.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"universal-neurons {writer}: error:"), got.stderr
    after = _checksums(work)
    assert after[target] == before[target], "the previous result was damaged"
    assert {k: v for k, v in after.items() if k in before} == before
    assert not _leftovers(work), _leftovers(work)
    rerun = subprocess.run([sys.executable, "-m", "universal_neurons", *argv], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "UNIVERSAL_NEURONS_PROGRESS": "0"})
    assert rerun.returncode == 0, rerun.stderr
