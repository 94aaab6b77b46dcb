"""The report on a real tiny pipeline run: one self-contained offline HTML file (plotly.js once,
no network), every section present when its inputs are, opened in headless Chromium with no
JavaScript errors and data in every figure; `.save` never silently overwrites."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from tests._report_fixtures import write_synthetic_stages
from tests.conftest import SAMPLE_TEXT
from universal_neurons.activations import TokenSetConfig
from universal_neurons.cli.main import main as cli
from universal_neurons.errors import UniversalNeuronsError
from universal_neurons.figures import (
    fig_corr_distributions,
    fig_excess_distribution,
    fig_max_corr_vs_baseline,
    fig_pair_correlations,
    fig_universal_fraction,
)
from universal_neurons.pipeline import PipelineConfig, run_pipeline
from universal_neurons.report import Report, report_stage

TEXT = [SAMPLE_TEXT * 3, SAMPLE_TEXT[::-1] * 2, SAMPLE_TEXT.upper() * 2]
# Two untrained seeds share little; a low cut flags some neurons so the table has rows.
CFG = PipelineConfig(tokens=TokenSetConfig(ctx_len=32), batch_rows=8, threshold=0.02)
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def base_run(tiny_family, tmp_path_factory):
    """A real pipeline run with the report stage, before any later stage wrote anything."""
    res = run_pipeline(tiny_family, TEXT, tmp_path_factory.mktemp("run") / "run", config=CFG,
                       extra_stages=[report_stage])
    return res


@pytest.fixture(scope="module")
def full_run(base_run, tmp_path_factory):
    """The same run plus property, ablation and persistence outputs: every section renders."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(base_run.out_dir, run_dir, ignore=shutil.ignore_patterns("stores", "report.html"))
    write_synthetic_stages(run_dir, base_run.table)
    return run_dir


@pytest.fixture(scope="module")
def full_report(full_run):
    return Report.from_run(full_run)


def test_report_stage_writes_report_and_summary(base_run):
    path = base_run.out_dir / "report.html"
    assert path.is_file()
    summary = json.loads((base_run.out_dir / "summary.json").read_text())
    assert summary["report"] == str(path)
    assert int(base_run.table["is_universal"].sum()) > 0  # the neuron table has rows
    # without later stages their sections are left out
    rep = Report.from_run(base_run.out_dir)
    assert [s.key for s in rep.sections] == ["universality", "correlations", "neurons", "provenance"]


def test_html_is_self_contained_with_provenance(full_report, full_run):
    html = full_report.to_html()
    assert html.count("plotly.js v") == 1  # the library's header comment: embedded once
    assert html.count("Plotly.newPlot(") == len(full_report.figures)
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)\s*=\s*[\"']?(https?:)?//", html, re.I)
    assert not re.search(r"<script[^>]+src\s*=", html, re.I)  # every script inline
    summary = json.loads((full_run / "summary.json").read_text())
    inp = summary["inputs"]
    for value in [inp["token_set"]["hash"], inp["token_set"]["tokenizer"]["fingerprint"],
                  *[m["resolved"] for m in inp["models"]], "center_writing_weights", "exclude_newlines",
                  "baseline seed", summary["versions"]["torch"]]:
        assert value in html, value
    assert {s.key for s in full_report.sections} == {"universality", "correlations", "neurons", "properties",
                                                     "ablation", "persistence", "provenance"}
    assert {"property_comparison", "property_effects", "ablation", "persistence", "persistence_by_layer",
            "partner_consistency", "emergence"} <= set(full_report.figures)
    assert isinstance(full_report.figures["max_corr_vs_baseline"].data[0], go.Scattergl)
    # the neuron table: one row per universal neuron, partners named
    n_uni = int(full_report.summary["universality"]["universal"])
    table = re.search(r'<table class="sortable" id="neuron-table">.*?</table>', html, re.S).group(0)
    assert table.count("<tr>") == n_uni + 1 and "partner in b" in table
    # notebooks get the same page, isolated in an iframe
    assert full_report._repr_html_().startswith("<iframe srcdoc=")


def test_save_refuses_to_overwrite(full_report, tmp_path):
    path = full_report.save(tmp_path / "r.html")
    before = path.read_bytes()
    with pytest.raises(UniversalNeuronsError, match="overwrite"):
        full_report.save(path)
    assert path.read_bytes() == before
    assert full_report.save(path, overwrite=True) == path


def test_cli_report(full_run, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert cli(["report", str(full_run), "-o", str(out)]) == 0
    assert out.is_file() and "Ablation" in capsys.readouterr().out
    assert cli(["report", str(full_run), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["report", str(full_run / "nothing-here")]) == 2


def test_figures_from_the_api(base_run):
    table = base_run.table
    for draw in (fig_max_corr_vs_baseline, fig_corr_distributions, fig_universal_fraction,
                 fig_excess_distribution, fig_pair_correlations):
        fig = draw(table)
        assert isinstance(fig, go.Figure) and len(fig.data) > 0, draw.__name__
    # bar heights are the per-layer universal percentages
    bars = fig_universal_fraction(table).data[0]
    np.testing.assert_allclose(bars.y, 100 * table.groupby("layer")["is_universal"].mean().to_numpy())
    # the histogram counts every live neuron once
    hist = fig_excess_distribution(table)
    assert sum(int(np.sum(trace.y)) for trace in hist.data) == int(np.isfinite(table["excess_corr"]).sum())
    with pytest.raises(UniversalNeuronsError, match="lacks the columns"):
        fig_universal_fraction(table.drop(columns=["is_universal"]))


@pytest.mark.skipif(not __import__("importlib").util.find_spec("playwright"), reason="playwright not installed")
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    from tests._browser import chromium_path, open_in_browser

    if not chromium_path():
        pytest.skip("no chromium: run scripts/install_browser.sh")
    path = full_report.save(tmp_path / "report.html")
    shot = ARTIFACTS / "report.png"
    got = open_in_browser(path, shot)
    print(f"report screenshot: {shot}")
    assert got["page_errors"] == [] and got["console_errors"] == []
    assert got["requests"] == []  # nothing fetched from any network
    assert len(got["figures"]) == len(full_report.figures)
    for f in got["figures"]:
        assert f["rendered"] and f["traces"] > 0 and f["with_points"] > 0 and f["height"] > 100, f
    col = got["sorted_column"]  # "excess" clicked twice: descending
    assert col and col == sorted(col, reverse=True)
    assert shot.is_file() and shot.stat().st_size > 50_000


def test_ablation_found_when_its_recorded_dir_is_relative_to_another_cwd(tmp_path):
    from universal_neurons.report import load_run

    run = tmp_path / "run"
    (run / "ablation").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"ablation": {"dir": "runs/elsewhere/ablation"}}))
    pd.DataFrame({"layer": [0], "neuron": [1], "excess_corr": [0.6], "is_universal": [True]}).to_csv(
        run / "universality.csv", index=False)
    pd.DataFrame({"group": ["all layers"], "delta_ce": [0.1]}).to_csv(run / "ablation" / "ablation_summary.csv",
                                                                       index=False)
    assert load_run(run)["ablation_summary"] is not None
