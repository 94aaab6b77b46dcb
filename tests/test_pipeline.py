"""The whole pipeline and the CLI on a tiny family: outputs exist, agree, and are never
silently overwritten."""

import json

import numpy as np
import pytest

from tests.conftest import SAMPLE_TEXT
from universal_neurons import CorrelationConfig, load_universality_table
from universal_neurons.activations import StoreConfig, TokenSetConfig, UniversalNeuronsError
from universal_neurons.cli.main import main as cli
from universal_neurons.pipeline import PipelineConfig, run_pipeline

TEXT = [SAMPLE_TEXT * 3, SAMPLE_TEXT[::-1] * 2, SAMPLE_TEXT.upper() * 2]
CFG = PipelineConfig(tokens=TokenSetConfig(ctx_len=32), batch_rows=8)


def test_pipeline_outputs_and_reuse(tiny_family, tmp_path):
    res = run_pipeline(tiny_family, TEXT, tmp_path / "run", config=CFG)
    out = res.out_dir
    for f in ("tokens.h5", "stores/a.h5", "stores/b.h5", "correlation.h5", "universality.csv", "universality.h5",
              "summary.json"):
        assert (out / f).exists(), f
    table = load_universality_table(out / "universality.csv")
    assert len(table) == 2 * 64 and {"excess_corr", "is_universal", "partner_layer_b"} <= set(table.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["token_set"]["hash"] == res.token_set.hash
    assert summary["universality"]["n_tokens"] == int(res.token_set.mask.sum())
    # the same run again reuses everything and gives the same table
    again = run_pipeline(tiny_family, TEXT, out, config=CFG)
    np.testing.assert_array_equal(again.table["excess_corr"].to_numpy(), res.table["excess_corr"].to_numpy())
    # other settings into the same directory are refused, not silently overwritten
    other = PipelineConfig(tokens=TokenSetConfig(ctx_len=32), batch_rows=8, correlation=CorrelationConfig(seed=7))
    with pytest.raises(UniversalNeuronsError, match="overwrite"):
        run_pipeline(tiny_family, TEXT, out, config=other)


def test_live_and_cached_pipelines_give_identical_tables(tiny_family, tmp_path):
    fp32 = PipelineConfig(tokens=TokenSetConfig(ctx_len=32), batch_rows=8,
                          store=StoreConfig(dtype="float32"))
    cached = run_pipeline(tiny_family, TEXT, tmp_path / "cached", config=fp32)
    live = run_pipeline(tiny_family, TEXT, tmp_path / "live",
                        config=PipelineConfig(tokens=TokenSetConfig(ctx_len=32), batch_rows=8, cache=False))
    assert not (tmp_path / "live" / "stores").exists()
    # batches differ (store chunks vs forward rows), so float sums differ in the last bits only
    for c in ["max_corr", "mean_baseline", "excess_corr"]:
        np.testing.assert_allclose(cached.table[c].to_numpy(), live.table[c].to_numpy(), rtol=0, atol=1e-6, err_msg=c)
    for c in ["is_universal", "partner_layer_b", "partner_neuron_b", "dead"]:
        np.testing.assert_array_equal(cached.table[c].to_numpy(), live.table[c].to_numpy(), err_msg=c)


def test_cli_tokenize_cache_correlate_flag(tiny_family, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    ts = tmp_path / "tokens.h5"
    assert cli(["tokenize", str(text), "--model", str(tiny_family[0]), "-o", str(ts), "--ctx-len", "32"]) == 0
    stores = []
    for k, d in enumerate(tiny_family):
        s = tmp_path / f"{k}.h5"
        assert cli(["cache", str(d), "--tokens", str(ts), "-o", str(s)]) == 0
        stores.append(str(s))
    corr = tmp_path / "corr.h5"
    assert cli(["correlate", *stores, "-o", str(corr)]) == 0
    assert cli(["flag", str(corr), "-o", str(tmp_path / "table.csv")]) == 0
    out = capsys.readouterr().out
    assert "preflight:" in out and "neurons universal" in out
    # an existing result is refused with a one-line error and exit code 2
    assert cli(["flag", str(corr), "-o", str(tmp_path / "table.csv")]) == 2
    assert "already exists" in capsys.readouterr().err
    # all pairs: one file per reference, the triangle's preflight; existing files refused before any work
    assert cli(["correlate", *stores, "--all-pairs", "-o", str(tmp_path / "ap.h5")]) == 0
    out = capsys.readouterr().out
    assert "one pass" in out and all((tmp_path / f"ap-ref-{lab}.h5").exists() for lab in ("a", "b"))
    stamp = (tmp_path / "ap-ref-b.h5").stat().st_mtime_ns
    assert cli(["correlate", *stores, "--all-pairs", "-o", str(tmp_path / "ap.h5")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "ap-ref-b.h5").stat().st_mtime_ns == stamp
    assert cli(["correlate", *stores, "--all-pairs", "--full-matrix", str(tmp_path / "full.h5"),
                "-o", str(tmp_path / "ap2.h5")]) == 2
    assert "--full-matrix is not available with --all-pairs" in capsys.readouterr().err
    assert not (tmp_path / "full.h5").exists() and not (tmp_path / "ap2-ref-a.h5").exists()
    # single reference: an existing -o is refused before the work too
    stamp = corr.stat().st_mtime_ns
    assert cli(["correlate", *stores, "-o", str(corr)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and corr.stat().st_mtime_ns == stamp


def test_pipeline_rejects_bad_families(tiny_family, tmp_path):
    with pytest.raises(UniversalNeuronsError, match="at least two models"):
        run_pipeline(tiny_family[:1], TEXT, tmp_path, config=CFG)
    with pytest.raises(UniversalNeuronsError, match="labels"):
        run_pipeline(tiny_family, TEXT, tmp_path, config=CFG, labels=["x", "x"])


def test_live_run_at_another_checkpoint_is_not_reused(tmp_path, tokenizer):
    from tests.conftest import make_family

    fam = make_family(tmp_path / "fam", steps=(0, 10), tokenizer=tokenizer)
    live = PipelineConfig(tokens=TokenSetConfig(ctx_len=32), batch_rows=8, cache=False)
    run_pipeline(fam, TEXT, tmp_path / "run", checkpoint=0, config=live)
    with pytest.raises(UniversalNeuronsError, match="other models, tokens or settings"):
        run_pipeline(fam, TEXT, tmp_path / "run", checkpoint=10, config=live)


def test_cli_run_writes_every_stage(tmp_path, tokenizer, capsys):
    from tests.conftest import make_family

    fam = make_family(tmp_path / "fam", steps=(0, 10), tokenizer=tokenizer)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    out = tmp_path / "run"
    code = cli(["run", *map(str, fam), "--text", str(text), "-o", str(out), "--ctx-len", "32",
                "--batch-rows", "8", "--threshold", "0.001", "--steps", "0,10"])
    assert code == 0, capsys.readouterr().err
    for f in ("universality.csv", "properties.csv", "ablation/ablation_summary.csv", "report.html"):
        assert (out / f).exists(), f
    summary = json.loads((out / "summary.json").read_text())
    assert {"properties", "ablation", "persistence", "report"} <= set(summary)
    assert "report ->" in capsys.readouterr().out
