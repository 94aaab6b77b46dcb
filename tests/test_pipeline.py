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


# ----------------------------------------------------------------------------- a directory holds one run


def _checksums(root):
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def cli_run(tmp_path, tokenizer):
    """`universal-neurons run` on a tiny family: the arguments every run below shares."""
    from tests.conftest import make_family

    fam = make_family(tmp_path / "fam", tokenizer=tokenizer)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    return ["run", *map(str, fam), "--text", str(text), "--ctx-len", "32", "--batch-rows", "8"]


def test_run_refuses_a_directory_of_another_run_before_any_work(cli_run, tmp_path, capsys):
    """The tester's case: the same directory, another --threshold, no --overwrite."""
    out = tmp_path / "run"
    assert cli([*cli_run, "-o", str(out), "--skip", "ablation,agreement"]) == 0, capsys.readouterr().err
    assert (out / "report.html").exists() and (out / "properties.csv").exists()
    before = _checksums(out)
    capsys.readouterr()
    assert cli([*cli_run, "-o", str(out), "--skip", "ablation,agreement", "--threshold", "0.001"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "config.threshold: 0.5 -> 0.001" in err and "--overwrite" in err and "whole run" in err
    assert _checksums(out) == before  # not one file written, rewritten or removed
    # other labels, or other text, are other runs too; the same run is let through (and reuses its stages)
    assert cli([*cli_run, "-o", str(out), "--skip", "ablation,agreement", "--labels", "x,y"]) == 2
    assert "labels" in capsys.readouterr().err and _checksums(out) == before
    assert cli([*cli_run, "-o", str(out), "--skip", "ablation,agreement"]) == 0


def test_overwrite_replaces_the_whole_run(cli_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli([*cli_run, "-o", str(out), "--threshold", "0.05"]) == 0, capsys.readouterr().err
    old = _checksums(out)
    assert {"ablation/ablation.json", "agreement/agreement.json", "properties.csv", "report.html"} <= set(old)
    # a run with another threshold that skips the ablation, the agreement and the report
    assert cli([*cli_run, "-o", str(out), "--threshold", "0.001", "--skip", "ablation,agreement,report",
                "--overwrite"]) == 0, capsys.readouterr().err
    new = _checksums(out)
    stale = [f for f in new if f.startswith(("ablation/", "agreement/")) or f == "report.html"]
    assert not stale, stale  # nothing of the earlier run survives next to the new results
    assert not (out / ".replaced-run").exists()
    summary = json.loads((out / "summary.json").read_text())
    table = load_universality_table(out / "universality.csv")
    assert summary["universality"]["threshold"] == 0.001 and summary["run"]["config"]["threshold"] == 0.001
    assert summary["universality"]["universal"] == int(table["is_universal"].sum())
    assert "ablation" not in summary and "report" not in summary
    assert new["property_comparison.csv"] != old["property_comparison.csv"]  # this run's universal set
    # and once more with the report: it agrees with the summary next to it
    assert cli([*cli_run, "-o", str(out), "--threshold", "0.2", "--skip", "ablation,agreement",
                "--overwrite"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["universality"]["threshold"] == 0.2 and "exceeds <b>0.2</b>" in (out / "report.html").read_text()


def test_a_failed_overwrite_puts_the_earlier_run_back(tiny_family, tmp_path):
    out = tmp_path / "run"
    run_pipeline(tiny_family, TEXT, out, config=CFG)
    before = _checksums(out)

    def boom(result):
        assert not (result.out_dir / "summary.json").exists()  # the earlier run is aside while this one runs
        raise RuntimeError("a stage failed")

    other = PipelineConfig(tokens=TokenSetConfig(ctx_len=32), batch_rows=8, threshold=0.01)
    with pytest.raises(RuntimeError, match="a stage failed"):
        run_pipeline(tiny_family, TEXT, out, config=other, overwrite=True, extra_stages=[boom])
    assert _checksums(out) == before and not (out / ".replaced-run").exists()


def test_where_a_run_computes_is_not_what_defines_it():
    from universal_neurons.run_directory import run_differences

    a = {"config": {"device": "cpu", "cluster": None, "threshold": 0.5, "correlation": {"device": "auto", "seed": 0}}}
    b = {"config": {"device": "cuda", "cluster": "local:2", "threshold": 0.5, "correlation": {"device": "cuda",
                                                                                            "seed": 0}},
         "models": ["x"]}  # a summary written before models were recorded does not compare them
    assert run_differences(a, b) == []
    b["config"]["correlation"]["seed"] = 1
    assert run_differences(a, b) == ["config.correlation.seed: 0 -> 1"]


def test_a_run_given_tokens_is_defined_by_them_not_by_tokenising_settings():
    from universal_neurons.run_directory import run_differences

    from_text = {"text": {"texts": 3, "sha256": "abc"}, "config": {"tokens": {"ctx_len": 32}, "threshold": 0.5}}
    from_tokens = {"text": {"token_set": "h1"}, "config": {"tokens": {"ctx_len": 512}, "threshold": 0.5}}
    assert run_differences(from_text, from_tokens, studied="h1") == []  # the tokens that text gave
    assert run_differences(from_text, from_tokens, studied="h2") == ["text.token_set: 'h2' -> 'h1'"]
    # text after tokens: compared once tokenised, by the token set stage (tokens.h5 of other tokens is refused)
    assert run_differences(from_tokens, from_text, studied="h1") == []
