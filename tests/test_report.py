"""The report on a real tiny pipeline run (with the explanations stage): one self-contained
offline HTML file (plotly.js once, no network), every section present when its inputs are,
opened in headless Chromium with no JavaScript errors, data in every figure, the Findings and a
card per universal neuron; `.save` never silently overwrites. The Findings' sentences against
planted tables; 2,000 neuron cards keep the file small and the first page quick."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from tests._report_fixtures import (
    synthetic_agreement,
    synthetic_explanations,
    synthetic_universality,
    write_synthetic_stages,
)
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


def keep(path: Path) -> Path:
    """A screenshot the test saved (under its tmp dir), also copied to `$UN_TEST_ARTIFACTS` when set."""
    target = os.environ.get("UN_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(target) / path.name)
    print(f"screenshot: {path}" + (f" (copied to {target})" if target else ""))
    return path


def cards_payload(html: str) -> dict:
    """The neuron cards' data as the page carries it."""
    text = re.search(r'<script type="application/json" class="cards-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(text)


@pytest.fixture(scope="module")
def base_run(tiny_family, tmp_path_factory):
    """A real pipeline run with the explanations stage and the report stage, before any other
    later stage wrote anything."""
    from universal_neurons.explain import ExplainConfig, explain_stage

    explain = explain_stage(config=ExplainConfig(k=5, n_contrast=3, device="cpu"))
    res = run_pipeline(tiny_family, TEXT, tmp_path_factory.mktemp("run") / "run", config=CFG,
                       extra_stages=[explain, report_stage])
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
    # the explanations stage ran before the report: its cards are in the page the pipeline wrote
    assert len(cards_payload(path.read_text())["cards"]) == int(base_run.table["is_universal"].sum())


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
    assert {s.key for s in full_report.sections} == {"universality", "agreement", "correlations", "neurons",
                                                     "properties", "ablation", "persistence", "provenance"}
    assert {"property_comparison", "property_effects", "ablation", "persistence", "persistence_by_layer",
            "partner_consistency", "emergence", "alike_over_training"} <= set(full_report.figures)
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


needs_browser = pytest.mark.skipif(not __import__("importlib").util.find_spec("playwright"),
                                   reason="playwright not installed")


def browser():
    from tests import _browser

    if not _browser.chromium_path():
        pytest.skip("no chromium: run scripts/install_browser.sh")
    return _browser


@needs_browser
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    path = full_report.save(tmp_path / "report.html")
    shot, cards_shot = tmp_path / "report.png", tmp_path / "report-neuron-cards.png"
    got = browser().open_in_browser(path, shot, cards_screenshot=cards_shot)
    keep(shot), keep(cards_shot)
    assert got["page_errors"] == [] and got["console_errors"] == []
    assert got["requests"] == []  # nothing fetched from any network
    assert len(got["figures"]) == len(full_report.figures)
    for f in got["figures"]:
        assert f["rendered"] and f["traces"] > 0 and f["with_points"] > 0 and f["height"] > 100, f
    assert "fig-alike_over_training" in {f["id"] for f in got["figures"]}
    col = got["sorted_column"]  # "excess" clicked twice: descending
    assert col and col == sorted(col, reverse=True)
    assert shot.is_file() and shot.stat().st_size > 50_000
    # the Findings: one line per question, on the first screen
    assert [f["topic"] for f in got["findings"]] == ["universal", "emergence", "properties", "families", "ablation",
                                                     "agreement"]
    assert all(f["visible"] for f in got["findings"][:2]), got["findings"]
    # the Neurons section: a card per universal neuron (the data), the first page drawn, tokens coloured
    n_uni = int(full_report.summary["universality"]["universal"])
    from universal_neurons.report.cards import PAGE_SIZE

    cards = got["cards"]
    assert cards["n_data"] == n_uni and cards["shown"] == min(PAGE_SIZE, n_uni)
    assert cards["count"].startswith(f"cards 1–{min(PAGE_SIZE, n_uni)} of {n_uni}")
    assert cards["contexts"] > 0 and cards["coloured"] > 0, cards
    assert cards_shot.is_file() and cards_shot.stat().st_size > 20_000


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


# ---------------------------------------------------------------------------- the Neurons section


def test_neuron_cards_one_per_universal_neuron(full_report, full_run, base_run):
    from universal_neurons.explain import load_explanations

    data = load_explanations(full_run / "explanations")
    n_uni = int(base_run.table["is_universal"].sum())
    payload = cards_payload(full_report.to_html())
    cards = payload["cards"]
    assert len(cards) == n_uni and payload["enc"] == "html"
    table = base_run.table.set_index(["layer", "neuron"])
    assert all(bool(table.loc[(c["l"], int(c["id"].split(".")[1])), "is_universal"]) for c in cards)
    excess = [c["x"] for c in cards]
    assert excess == sorted(excess, reverse=True)  # highest excess first
    refs = data.neurons[data.neurons["is_reference"]].set_index(["layer", "neuron"])
    assert all(c["f"] == refs.loc[(c["l"], int(c["id"].split(".")[1])), "family"] for c in cards)
    # each card is the explanations stage's own view: partners side by side, coloured contexts
    first = cards[0]["h"]
    assert first.startswith('<div class="unx">') and first.count('class="tok focus"') >= 2
    assert "promotes" in first and "best features" in first
    # the cap: the neurons with the highest excess correlation
    capped = Report.from_run(full_run, max_cards=3)
    html = capped.to_html()
    assert [c["id"] for c in cards_payload(html)["cards"]] == [c["id"] for c in cards[:3]]
    assert f"The 3 neurons with the highest excess correlation of {n_uni:,} have a card." in html
    # one section alone, e.g. in a notebook
    alone = full_report.only("neurons")
    assert [s.key for s in alone.sections] == ["neurons"] and alone.findings == [] and alone.figures == {}
    assert 'class="cards-data"' in alone.to_html()
    with pytest.raises(UniversalNeuronsError, match="no section"):
        full_report.only("nothing")


def test_without_explanations_the_section_says_how_to_get_cards(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run.out_dir, run, ignore=shutil.ignore_patterns("stores", "explanations", "report.html"))
    html = Report.from_run(run).to_html()
    assert 'class="cards-data"' not in html and "universal-neurons explain RUN --all" in html


@needs_browser
def test_two_thousand_cards_stay_small_and_quick(tmp_path):
    from universal_neurons.report.cards import PAGE_SIZE

    table = synthetic_universality(n_universal=2000)
    data = synthetic_explanations(table)
    report = Report.from_data(summary={"universality": {"threshold": 0.5}}, table=table, explanations=data)
    path = report.save(tmp_path / "big.html")
    html = path.read_text()
    payload = cards_payload(html)
    assert len(payload["cards"]) == 2000 and payload["enc"] == "gzip"
    per_card = len(re.search(r'class="cards-data">(.*?)</script>', html, re.S).group(1)) / 2000
    size_mb = path.stat().st_size / 1e6
    print(f"2,000 cards: {size_mb:.1f} MB in all, {per_card / 1e3:.1f} kB per card")
    assert per_card < 10_000 and size_mb < 30  # plotly.js is ~4.6 MB of it
    shot = tmp_path / "big-report-cards.png"
    got = browser().exercise_cards(path, shot, layer=2, family="position")
    keep(shot)
    assert got["page_errors"] == [] and got["console_errors"] == []
    first, second = got["first"], got["second"]
    print(f"first page of cards drawn {first['first_drawn_ms']:.0f} ms after navigation began")
    assert first["shown"] == PAGE_SIZE and first["coloured"] > 0 and first["count"] == f"cards 1–{PAGE_SIZE} of 2000"
    assert first["first_drawn_ms"] < 15_000  # a generous bound on a shared 2-core machine; typically ~2 s
    order = [c["id"] for c in payload["cards"]]
    assert first["ids"] == order[:PAGE_SIZE] and second["ids"] == order[PAGE_SIZE:2 * PAGE_SIZE]
    assert set(got["by_layer"]["layers"]) == {"2"} and "filtered from 2000" in got["by_layer"]["count"]
    assert set(got["by_family"]["families"]) == {"position"} and got["by_family"]["shown"] == PAGE_SIZE


# ---------------------------------------------------------------------------- the Findings


def test_findings_block_states_each_result(full_report):
    html = full_report.to_html()
    block = re.search(r'<section class="findings" id="findings">.*?</section>', html, re.S).group(0)
    assert [f.topic for f in full_report.findings] == ["universal", "emergence", "properties", "families", "ablation",
                                                       "agreement"]
    for f in full_report.findings:
        assert html_escape(f.text) in block
    n_uni = int(full_report.summary["universality"]["universal"])
    assert full_report.findings[0].text.startswith(f"{n_uni:,} of 128 neurons are universal")
    families = full_report.findings[3].text  # counted from the explanations' reference neurons
    assert f"of the {n_uni:,} universal neurons explained, " in families and "of 3 other neurons sampled" in families
    # under the title, before the numbers and the sections
    assert html.index('id="findings"') < html.index('class="cards"') < html.index("<nav>")


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_wilson_interval_equals_a_direct_computation():
    from scipy.stats import binomtest

    from universal_neurons.figures import wilson_interval

    for k, n in [(4, 1024), (0, 1024), (1024, 1024), (13, 40), (1, 3)]:
        lo, hi = wilson_interval(k, n)
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        np.testing.assert_allclose([lo, hi], [ref.low, ref.high], rtol=0, atol=1e-12)
        z, p = 1.959963984540054, k / n  # the textbook formula, written out
        centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
        half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
        np.testing.assert_allclose([lo, hi], [max(0, centre - half), min(1, centre + half)], atol=1e-12)
    lo, hi = wilson_interval(13, 40, level=0.9)
    ref = binomtest(13, 40).proportion_ci(confidence_level=0.9, method="wilson")
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-12)


def planted_table(counts: dict[int, int], d_mlp: int = 512) -> pd.DataFrame:
    """A universality table with `counts[layer]` universal neurons per layer."""
    rows = []
    for layer, k in counts.items():
        for neuron in range(d_mlp):
            rows.append({"layer": layer, "neuron": neuron, "excess_corr": 0.6 if neuron < k else 0.1,
                         "is_universal": neuron < k, "max_corr_b": 0.5})
    return pd.DataFrame(rows)


def test_universal_finding_states_the_fraction_with_its_interval_and_where():
    from universal_neurons.figures import wilson_interval
    from universal_neurons.report.findings import findings

    summary = {"universality": {"threshold": 0.5}, "inputs": {"models": [{}] * 5}}
    text = findings(summary=summary, table=planted_table({0: 0, 1: 4}))[0].text
    lo, hi = wilson_interval(4, 1024)
    assert text.startswith(f"4 of 1,024 neurons are universal (0.39%; 95% Wilson interval {100 * lo:.2f}% to "
                           f"{100 * hi:.2f}%, treating neurons as independent draws)")
    assert "averaged over the 4 other seeds" in text and "All are in layer 1 (4 of its 512, 0.78%)" in text
    spread = findings(summary=summary, table=planted_table({0: 8, 1: 4}))[0].text
    assert "By layer, layer 0: 8 of 512 (1.56%); layer 1: 4 of 512 (0.78%)." in spread
    none = findings(summary=summary, table=planted_table({0: 0, 1: 0}))[0].text
    _, hi0 = wilson_interval(0, 1024)
    assert none.startswith("No neuron of 1,024 is universal") and f"0 to {100 * hi0:.2f}%" in none


def ablation_row(**kw) -> pd.DataFrame:
    row = {"group": "all layers", "layer": -1, "n_neurons": 4, "delta_ce": 0.012, "delta_ce_lo": 0.01,
           "delta_ce_hi": 0.014, "control_delta_ce_mean": 0.002, "p_value": 0.01, "p_value_min": 0.01,
           "paired_delta_ce": 0.01, "paired_delta_ce_lo": 0.008, "paired_delta_ce_hi": 0.012,
           "delta_ce_per_neuron": 0.003}
    return pd.DataFrame([{**row, **kw}])


def test_ablation_finding_words_significant_and_not():
    from universal_neurons.report.findings import findings

    def said(table, kind="mean"):
        out = findings(summary={"ablation": {"kind": kind}}, table=planted_table({0: 4}), ablation_summary=table)
        return next(f for f in out if f.topic == "ablation")

    yes = said(ablation_row())
    assert yes.significant is True
    assert yes.text == ("Mean-ablating the 4 universal neurons together raises the next-token loss by 0.012 nats "
                        "(95% interval 0.01 to 0.014), 0.003 nats per neuron. That is 0.01 nats more than random sets "
                        "of the same size from the same layers (paired difference, 95% interval 0.008 to 0.012; "
                        "p = 0.01 against 99 random sets).")
    no = said(ablation_row(delta_ce=-0.00045, delta_ce_lo=-0.001, delta_ce_hi=0.0002, paired_delta_ce=-0.0002,
                           paired_delta_ce_lo=-0.001, paired_delta_ce_hi=0.0006, p_value=0.31,
                           delta_ce_per_neuron=-0.0001125))
    assert no.significant is False
    assert "lowers the next-token loss by 0.00045 nats" in no.text
    assert ("not distinguishable from random sets of the same size (paired difference -0.0002 nats, 95% interval "
            "-0.001 to 0.0006; p = 0.31 against 99 random sets)") in no.text
    few = said(ablation_row(p_value=1 / 6, p_value_min=1 / 6, paired_delta_ce_lo=-0.001))
    assert few.significant is False and "With 5 controls the p-value cannot go below 0.17" in few.text
    weak = said(ablation_row(p_value=0.04, paired_delta_ce_lo=-0.001))
    assert weak.significant is False and "interval includes 0" in weak.text and "p = 0.04" in weak.text
    less = said(ablation_row(paired_delta_ce=-0.01, paired_delta_ce_lo=-0.02, paired_delta_ce_hi=-0.005, p_value=0.99))
    assert less.significant is False and "less than random sets" in less.text


def test_property_finding_reports_the_largest_effects_with_p_values():
    from universal_neurons.report.findings import findings, holm

    comparison = pd.DataFrame({"property": ["w_out_norm", "input_bias", "pre_skew"], "n_universal": [40] * 3,
                               "n_other": [984] * 3, "median_universal": [1.2, -0.5, 2.0],
                               "median_other": [0.9, -0.1, 1.9], "p_value": [1e-5, 0.004, 0.4],
                               "rank_biserial": [0.61, -0.3, 0.05]})
    np.testing.assert_allclose(holm(comparison["p_value"].to_numpy()), [3e-5, 0.008, 0.4])

    def said(table):
        out = findings(summary={}, table=planted_table({0: 4}), property_comparison=table)
        return next(f for f in out if f.topic == "properties")

    both = said(comparison)
    assert both.significant is True
    assert both.text.startswith("Universal neurons have higher w_out_norm (median 1.2 vs 0.9, r = +0.61, "
                                "p = 1.0e-05); lower input_bias (median -0.5 vs -0.1, r = -0.30, p = 0.004). "
                                "2 of 3 properties differ")
    none = said(comparison.assign(p_value=[0.2, 0.3, 0.4]))
    assert none.significant is False
    assert none.text.startswith("No property separates universal from other neurons at 0.05 after Holm's correction")
    assert "the largest effect is higher w_out_norm (median 1.2 vs 0.9, r = +0.61, p = 0.2)" in none.text
    small = said(comparison.assign(n_universal=4))
    assert "With 4 universal neurons these tests have little power." in small.text


def test_emergence_and_agreement_findings():
    from universal_neurons.report.findings import findings

    emergence = pd.DataFrame({"step": [0, 0, 100, 100, 1000, 1000, 4000, 4000], "layer": [0, 1] * 4,
                              "n_neurons": [512] * 8, "n_universal": [0, 0, 0, 2, 1, 3, 2, 6]})
    emergence["fraction"] = emergence["n_universal"] / emergence["n_neurons"]
    table = planted_table({0: 2, 1: 6})
    agreement = synthetic_agreement(table, steps=(0, 100, 1000, 4000))
    out = {f.topic: f for f in findings(summary={}, table=table, emergence=emergence, agreement=agreement)}
    assert out["emergence"].text.startswith("The universal fraction went from 0.00% at step 0 (0.00% to 0.37%) to "
                                            "0.78% at step 4,000")
    assert "present at 3 of 4 checkpoints (steps 100, 1,000, 4,000)" in out["emergence"].text
    end, init = agreement.by_step.iloc[-1], agreement.by_step.iloc[0]
    text = out["agreement"].text
    assert f"agree on {100 * end['top1']:.1f}% of predictions on held-out tokens" in text
    assert f"95% interval {100 * end['top1_lo']:.1f}% to {100 * end['top1_hi']:.1f}%" in text
    assert f"against {100 * init['top1']:.1f}%" in text and "the intervals do not overlap" in text
    assert f"Jensen-Shannon divergence is {end['js']:.3g} nats" in text
    # seeds no more alike than at initialisation: said so
    flat = agreement.by_step.copy()
    for c in ("top1", "top1_lo", "top1_hi"):
        flat.loc[flat.index[-1], c] = flat.loc[flat.index[0], c]
    agreement.by_step = flat
    same = next(f for f in findings(summary={}, table=table, agreement=agreement) if f.topic == "agreement")
    assert "not distinguishable from initialisation" in same.text


def test_agreement_section_with_several_pairs_shows_each_pair():
    table = synthetic_universality(n_layers=2, d_mlp=64, n_universal=10)
    emergence = pd.DataFrame({"step": [0, 0, 10, 10], "layer": [0, 1, 0, 1], "n_neurons": [64] * 4,
                              "n_universal": [0, 1, 3, 7], "fraction": [0, 1 / 64, 3 / 64, 7 / 64]})
    report = Report.from_data(summary={}, table=table, emergence=emergence,
                              agreement=synthetic_agreement(table, steps=(0, 10)))
    section = next(s for s in report.sections if s.key == "agreement")
    assert section.figures == ["alike_over_training", "agreement"]
    fig = report.figures["alike_over_training"]
    assert [a.text for a in fig.layout.annotations][:3] == ["outputs: top-1 agreement",
                                                            "outputs: Jensen-Shannon divergence (nats)",
                                                            "neurons: universal (% of all neurons)"]
    overall = next(t for t in fig.data if t.name.startswith("neurons, all layers"))
    np.testing.assert_allclose(overall.y, [100 / 128, 1000 / 128])


def test_agreement_from_the_summary_when_its_folder_is_gone(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("agreement", "explanations"))
    from universal_neurons.agreement import AgreementResult

    by_step = AgreementResult.load(full_run / "agreement").by_step
    summary = json.loads((run / "summary.json").read_text())
    summary["agreement"] = {"dir": "agreement", "by_step": json.loads(by_step.to_json(orient="records")),
                            "tokens": {"which": "held-out (tokens_held_out.h5 of the run)"}}
    (run / "summary.json").write_text(json.dumps(summary))
    report = Report.from_run(run)
    assert next(s for s in report.sections if s.key == "agreement").figures == ["alike_over_training"]
    said = next(f for f in report.findings if f.topic == "agreement").text
    assert f"agree on {100 * by_step['top1'].iloc[-1]:.1f}% of predictions on held-out tokens" in said
