"""The report's content: which sections a run's outputs make, their figures, the neuron table
and cards, the headline cards and the provenance. Everything here is computed from tables in
memory; reading them is `run_dir.load_run`'s job, the sentences of the Findings
`findings.py`'s, the neuron cards `cards.py`'s, laying out the page `document.Report`'s."""

from __future__ import annotations

import html
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from universal_neurons.errors import UniversalNeuronsError

from ..figures import (
    fig_ablation,
    fig_corr_distributions,
    fig_emergence,
    fig_excess_distribution,
    fig_max_corr_vs_baseline,
    fig_pair_correlations,
    fig_partner_consistency,
    fig_persistence,
    fig_persistence_by_layer,
    fig_property_comparison,
    fig_property_effects,
    fig_universal_fraction,
    live_neurons,
    other_labels,
)
from ..figures.agreement import fig_alike_over_training
from .cards import MAX_CARDS, cards_html, neuron_cards
from .markup import escape, key_value_table, sortable_table, stage_table

__all__ = ["MAX_TABLE_ROWS", "ReportSection", "build_sections", "headline_cards", "report_title"]

log = logging.getLogger(__name__)

MAX_TABLE_ROWS = 5000  # rows of the neuron table; beyond it the HTML gets slow to sort


@dataclass
class ReportSection:
    """One section of the report: a title, a short explanation (HTML), its figures (by name in
    `Report.figures`) and any extra HTML (tables)."""

    key: str
    title: str
    intro: str
    figures: list[str] = field(default_factory=list)
    html: str = ""


def build_sections(*, summary: dict, table: pd.DataFrame, properties: pd.DataFrame | None = None,
                   property_comparison: pd.DataFrame | None = None, ablation_summary: pd.DataFrame | None = None,
                   ablation_runs: pd.DataFrame | None = None, persistence: dict[str, pd.DataFrame] | None = None,
                   emergence: pd.DataFrame | None = None, explanations: Any = None, agreement: Any = None,
                   max_cards: int = MAX_CARDS) -> tuple[list[ReportSection], dict[str, go.Figure]]:
    """Every section whose inputs are present, in reading order, with its figures.

    A later stage's section whose figure cannot be drawn from its table is left out (logged),
    so one odd table never costs the whole report.

    Args:
        summary: the run's `summary.json`.
        table: the universality table, one row per reference neuron (its `attrs["threshold"]`
            is set to the summary's threshold).
        properties, property_comparison, ablation_summary, ablation_runs, emergence: the later
            stages' tables, None when absent.
        persistence: `overall`, `per_layer`, `partner_consistency` tables (any subset).
        explanations: the explanations stage's `ExplanationData`: a card per universal neuron
            in the Neurons section; None leaves the cards out.
        agreement: the agreement stage's `AgreementResult`: the section on how alike the seeds
            behave; None leaves it out.
        max_cards: the cap on neuron cards (the highest excess correlation first).

    Returns:
        The sections and the figures they name (name -> plotly figure).
    """
    universality = summary.get("universality", {})
    thr = float(universality.get("threshold", table.attrs.get("threshold", 0.5)))
    table.attrs["threshold"] = thr
    figs: dict[str, go.Figure] = {}
    sections: list[ReportSection] = []
    labels = summary.get("inputs", {}).get("labels") or ["a", *other_labels(table)]
    ref = labels[0] if labels else "a"

    figs["universal_fraction"] = fig_universal_fraction(table)
    figs["excess_distribution"] = fig_excess_distribution(table, threshold=thr)
    sections.append(ReportSection(
        "universality", "Universality",
        f"Each neuron of the reference model <b>{escape(ref)}</b> is matched to its most correlated neuron in "
        f"every other seed ({escape(', '.join(labels[1:]))}). Its <b>excess correlation</b> is that max-correlation "
        "minus the max-correlation with randomly rotated units of the same seed (the chance baseline), averaged "
        f"over seeds; a neuron is <b>universal</b> when the excess exceeds <b>{thr:g}</b>. Left: the share of "
        "universal neurons per layer (the paper finds them concentrated in the first and last layers). Right: the "
        "distribution of excess correlation on a log scale, universal neurons in red to the right of the cut.",
        ["universal_fraction", "excess_distribution"]))

    if agreement is not None:
        section = _agreement_section(agreement, emergence, figs)
        if section is not None:
            sections.append(section)

    figs["corr_distributions"] = fig_corr_distributions(table)
    figs["max_corr_vs_baseline"] = fig_max_corr_vs_baseline(table, threshold=thr)
    extra = ["pair_correlations"] if other_labels(table) else []
    if extra:
        figs["pair_correlations"] = fig_pair_correlations(table)
    sections.append(ReportSection(
        "correlations", "Max-correlation vs baseline",
        "Left: per layer, the distribution of each neuron's max-correlation with the other seeds (red, right "
        "half) against its chance baseline (blue, left half); lines mark the means. Right: the same per neuron; "
        "points above the dashed line are universal (ringed in red); hover a point for its layer and index. "
        "Below: the comparison per seed, which should look alike for every seed (boxes span the quartiles, "
        "whiskers the 5th and 95th percentiles).",
        ["corr_distributions", "max_corr_vs_baseline", *extra]))

    neuron_rows, note = _neuron_table(table, properties)
    others = labels[1:] if len(labels) > 1 else other_labels(table)
    n_universal = int(table["is_universal"].sum())
    sections.append(ReportSection(
        "neurons", f"Neurons ({n_universal:,} universal)",
        "Every universal neuron of the reference with its partner (best-matching neuron, as "
        "<code>L&lt;layer&gt;.N&lt;index&gt;</code>) and correlation in each other seed "
        f"({escape(', '.join(others))}). "
        "Click a column header to sort; type in the box to filter. Below the table, a card per neuron shows "
        "what it responds to and what it does, beside its partners.",
        html=(f'<p class="note">{escape(note)}</p>' if note else "")
        + sortable_table(neuron_rows, table_id="neuron-table")
        + _cards_part(explanations, n_universal, max_cards)))

    if properties is not None:
        try:
            figs["property_comparison"] = fig_property_comparison(table, properties, comparison=property_comparison)
            names = ["property_comparison"]
            if property_comparison is not None:
                try:
                    figs["property_effects"] = fig_property_effects(property_comparison)
                    names.insert(0, "property_effects")
                except UniversalNeuronsError as err:
                    log.warning("report: property effects left out: %s", err)
            sections.append(ReportSection(
                "properties", "Properties of universal neurons",
                "Weight and activation statistics of universal neurons (red) against all other neurons (grey): "
                "boxes span the quartiles, whiskers the 5th to 95th percentiles, p-values from a Mann-Whitney U "
                "test. The paper finds universal neurons to have <b>larger weight norms</b>, <b>more negative "
                "input bias</b>, <b>higher skew and kurtosis</b> of activations and <b>lower activation "
                "frequency</b>. Moments (pre_*) are of the pre-activation; vocab_* are moments over the "
                "vocabulary of cos(w_out, W_U). Kurtosis (*_kurt) is <b>raw</b>, mean(z<sup>4</sup>): a Gaussian "
                "has 3, as in the paper's tables." + _family_note(summary),
                names, html=stage_table(property_comparison, "Comparison per property")))
        except UniversalNeuronsError as err:
            log.warning("report: properties left out: %s", err)

    if ablation_summary is not None:
        try:
            figs["ablation"] = fig_ablation(ablation_summary, ablation_runs)
            sections.append(ReportSection(
                "ablation", "Ablation",
                "Each group of universal neurons is ablated at once and the change in next-token loss is "
                "measured on held-out tokens (red, with its confidence interval), next to random control sets "
                "of the same size drawn from the same layers (grey: mean and interval over draws; dots: single "
                "draws). A red bar well above the grey means the universal neurons matter more to the model "
                "than random ones, as the follow-up paper reports.",
                ["ablation"], html=stage_table(ablation_summary, "Ablation summary")))
        except UniversalNeuronsError as err:
            log.warning("report: ablation left out: %s", err)

    persistence_names = _persistence_figures(persistence or {}, emergence, figs)
    if persistence_names:
        sections.append(ReportSection(
            "persistence", "Persistence across training",
            "For training checkpoints t &lt; t′, persistence is the fraction of neurons universal at t that are "
            "still universal at t′ (row: t, column: t′); bright cells right of the diagonal mean universality, "
            "once there, stays. Emergence curves show the universal fraction per layer as training goes on. "
            "The follow-up paper finds persistence highest in the early and deep layers.",
            persistence_names))

    sections.append(ReportSection("provenance", "Provenance",
                                  "Everything this report was computed from, so a result can be traced and "
                                  "reproduced.", html=_provenance_html(summary)))
    return sections, figs


def _agreement_section(agreement: Any, emergence: pd.DataFrame | None,
                       figs: dict[str, go.Figure]) -> ReportSection | None:
    """How alike the seeds behave: their outputs' agreement over training, beside the universal
    fraction of their neurons when checkpoints give one (None when the figure cannot be drawn)."""
    from universal_neurons.agreement import fig_agreement

    ci = float((agreement.provenance.get("config") or {}).get("ci") or 0.95)
    names = []
    try:
        if emergence is not None and len(emergence):
            figs["alike_over_training"] = fig_alike_over_training(agreement.by_step, emergence, ci=ci)
            names.append("alike_over_training")
        pairs = agreement.table[["a", "m"]].drop_duplicates()
        if not names or len(pairs) > 1:  # with one pair, every pair's figure repeats the first
            figs["agreement"] = fig_agreement(agreement)
            names.append("agreement")
    except UniversalNeuronsError as err:
        log.warning("report: agreement left out: %s", err)
        return None
    which = (agreement.provenance.get("token_set") or {}).get("which")
    return ReportSection(
        "agreement", "How alike the seeds behave",
        "Universality asks whether the seeds share <b>neurons</b>; this asks whether they compute the same "
        "<b>function</b>. For each pair of seeds, on the same "
        f"{'held-out ' if which and str(which).startswith('held-out') else ''}tokens: <b>top-1 agreement</b> (the "
        "share of predictions whose most likely next token is the same) and the <b>Jensen-Shannon divergence</b> of "
        "their next-token distributions (0 when identical, at most ln 2 = 0.693 nats), each the mean over pairs "
        f"with a {ci:.0%} bootstrap interval over token rows. Step 0 is initialisation: untrained seeds all predict "
        "near-uniform distributions, so their divergence is small there; top-1 agreement is the fair comparison. "
        + ("The first figure puts the outputs beside the neurons (the universal fraction per checkpoint, with its "
           "Wilson interval). " if "alike_over_training" in names else "")
        + ("Thin lines: each pair. " if "agreement" in names else "")
        + "Definitions: docs/agreement.md.",
        names, html=stage_table(agreement.by_step, "Agreement per checkpoint")
        + stage_table(agreement.table, "Agreement per pair and checkpoint"))


def _cards_part(explanations: Any, n_universal: int, max_cards: int) -> str:
    """The neuron cards under the table, or a note saying how to get them."""
    if explanations is None:
        return ('<p class="note">Run the explanations stage (<code>universal-neurons explain RUN --all</code>, '
                "part of <code>run</code> and <code>demo</code>) to see a card per neuron here.</p>")
    cards = neuron_cards(explanations, n_universal=n_universal, max_cards=max_cards)
    if not cards.cards:
        return '<p class="note">The explanations hold no neuron to show.</p>'
    who = "universal neuron" if cards.role == "universal" else "neuron explained for contrast"
    return (f"<h3>One card per {who} ({len(cards.cards):,}, highest excess correlation first)</h3>"
            '<p class="intro">Each card: the seeds\' neurons side by side (correlation with the reference, family from '
            "the activations, best features by variance reduction, the tokens its output promotes and suppresses), "
            "then the reference's top-activating contexts with every seed's activation, a row per seed: tokens "
            "coloured by activation over that seed's maximum (orange above zero, blue below), the example token "
            "outlined. Filter by layer and family; <code>explain(run_dir, layer, neuron)</code> shows a neuron in "
            "full.</p>" + cards_html(cards))


def _family_note(summary: dict) -> str:
    """The family rules of the properties stage in a sentence (empty when the run has none)."""
    rules = (summary.get("properties") or {}).get("family_rules")
    if not isinstance(rules, dict):
        return ""
    parts = [f"{name}: {escape(str(rules[name]))}" for name in ("prediction", "suppression", "partition", "entropy")
             if name in rules]
    return (f" The neuron table's family comes from weights alone ({escape(str(rules.get('rule', '')))} rule): "
            + "; ".join(parts) + ".")


def _neuron_table(table: pd.DataFrame, props: pd.DataFrame | None) -> tuple[pd.DataFrame, str]:
    """The rows of the neuron table (universal neurons, highest excess first) and a note on
    what was left out."""
    others = other_labels(table)
    shown = table[table["is_universal"].astype(bool)]
    note = ""
    if not len(shown):
        shown = live_neurons(table).nlargest(25, "excess_corr")
        note = "No neuron passes the threshold; the 25 with the highest excess correlation are shown instead."
    shown = shown.sort_values("excess_corr", ascending=False)
    if len(shown) > MAX_TABLE_ROWS:
        note = f"The {MAX_TABLE_ROWS:,} universal neurons with the highest excess correlation of {len(shown):,}."
        shown = shown.head(MAX_TABLE_ROWS)
    out = pd.DataFrame({"neuron": [f"L{layer}.N{index}" for layer, index in zip(shown["layer"], shown["neuron"])],
                        "layer": shown["layer"].astype(int).to_numpy(),
                        "index": shown["neuron"].astype(int).to_numpy(),
                        "excess": shown["excess_corr"].to_numpy(), "mean corr": shown["mean_corr"].to_numpy(),
                        "mean baseline": shown["mean_baseline"].to_numpy()})
    for label in others:
        partner_layers = shown[f"partner_layer_{label}"].to_numpy()
        partner_indices = shown[f"partner_neuron_{label}"].to_numpy()
        out[f"partner in {label}"] = [f"L{int(layer)}.N{int(index)}" if np.isfinite(layer) and np.isfinite(index)
                                      else "–" for layer, index in zip(partner_layers, partner_indices)]
        out[f"corr {label}"] = shown[f"max_corr_{label}"].to_numpy()
    if props is not None and "family" in props.columns:
        family = props.set_index(["layer", "neuron"])["family"]
        out["family"] = [family.get((int(layer), int(index)), "")
                         for layer, index in zip(shown["layer"], shown["neuron"])]
    return out, note


def _persistence_figures(persistence: dict[str, pd.DataFrame], emergence: pd.DataFrame | None,
                         figs: dict[str, go.Figure]) -> list[str]:
    """Draw the persistence figures whose tables are present into `figs`; return their names."""
    names = []
    builders: list[tuple[str, str, Callable[[pd.DataFrame], go.Figure]]] = [
        ("overall", "persistence", fig_persistence),
        ("per_layer", "persistence_by_layer", fig_persistence_by_layer),
        ("partner_consistency", "partner_consistency", fig_partner_consistency)]
    for key, name, draw in builders:
        df = persistence.get(key)
        if df is None:
            continue
        try:
            figs[name] = draw(df)
            names.append(name)
        except (UniversalNeuronsError, KeyError, ValueError) as err:
            log.warning("report: %s left out: %s", name, err)
    if emergence is not None:
        try:
            figs["emergence"] = fig_emergence(emergence)
            names.append("emergence")
        except UniversalNeuronsError as err:
            log.warning("report: emergence left out: %s", err)
    return names


def report_title(summary: dict, run_dir: str | os.PathLike | None) -> str:
    """"Universal neurons · <family>", the family named after the reference model without its
    seed suffix (or after the run directory)."""
    models = summary.get("inputs", {}).get("models", [])
    name = models[0].get("name", "") if models else ""
    family = re.sub(r"[-_]?(seed-?)?[a-e]$", "", name) or (Path(run_dir).name if run_dir else "")
    return f"Universal neurons · {family}" if family else "Universal neurons"


def headline_cards(summary: dict, table: pd.DataFrame, ablation: pd.DataFrame | None,
                   agreement: Any = None) -> list[tuple[str, str, bool]]:
    """The numbers at the top of the report.

    Args:
        summary: the run's `summary.json`.
        table: the universality table.
        ablation: the ablation summary, or None.
        agreement: the agreement stage's `AgreementResult`, or None.

    Returns:
        `(label, value, accent)` per card.
    """
    universality = summary.get("universality", {})
    n_neurons = universality.get("neurons", len(table))
    n_universal = universality.get("universal", int(table["is_universal"].sum()))
    frac = universality.get("universal_fraction", n_universal / max(n_neurons, 1))
    models = summary.get("inputs", {}).get("models", [])
    first = models[0] if models else {}
    layers = first.get("n_layers") or int(table["layer"].nunique())
    d_mlp = first.get("d_mlp") or int(table.groupby("layer").size().max())
    dead_counts = universality.get("dead")
    dead = (sum((dead_counts or {}).values()) if isinstance(dead_counts, dict)
            else int(table.get("dead", pd.Series([])).sum()))
    corr = summary.get("config", {}).get("correlation", {})
    cards = [("universal neurons", f"{n_universal:,} ({100 * frac:.2f}%)", True),
             ("neurons", f"{n_neurons:,} = {layers} × {d_mlp:,}", False),
             ("seeds", str(len(models) or len(other_labels(table)) + 1), False),
             ("tokens counted", f"{universality.get('n_tokens', 0):,}", False),
             ("threshold", f"excess > {universality.get('threshold', 0.5):g}", False),
             ("baseline", f"{corr.get('baseline', '?')} (seed {corr.get('seed', '?')})", False),
             ("dead neurons", f"{dead:,}", False)]
    if ablation is not None and {"delta_ce", "control_delta_ce_mean"} <= set(ablation.columns):
        whole = ablation[ablation["group"].astype(str) == "all layers"]
        rows = whole if len(whole) else ablation
        if "paired_delta_ce" in rows.columns and pd.notna(rows["paired_delta_ce"].iloc[0]):
            p = rows["p_value"].iloc[0] if "p_value" in rows.columns else np.nan
            cards.append(("ΔCE universal − random", f"{rows['paired_delta_ce'].iloc[0]:+.3g} nats"
                          + (f" (p = {p:.2g})" if pd.notna(p) else ""), True))
        else:
            ratio = rows["delta_ce"].sum() / max(abs(rows["control_delta_ce_mean"].sum()), 1e-12)
            cards.append(("ΔCE universal / random", f"{ratio:.1f}×", True))
    if agreement is not None and len(agreement.by_step):
        by_step = agreement.by_step.sort_values("step", na_position="last")
        init = by_step[by_step["at_init"].astype(bool)] if "at_init" in by_step else by_step.iloc[:0]
        trained = by_step[~by_step["at_init"].astype(bool)] if "at_init" in by_step else by_step
        if len(trained):
            value = f"{100 * trained['top1'].iloc[-1]:.1f}%"
            if len(init):
                value += f" (init {100 * init['top1'].iloc[0]:.1f}%)"
            cards.append(("seeds' top-1 agreement", value, True))
    return cards


def _provenance_html(summary: dict) -> str:
    """Models, token set, mask policy, settings, later stages, versions and the raw summary."""
    inputs = summary.get("inputs", {})
    labels = inputs.get("labels") or []
    out = []
    models = inputs.get("models", [])
    if models:
        rows = []
        for k, model in enumerate(models):
            processing = model.get("weight_processing") or {}
            rows.append({"label": labels[k] if k < len(labels) else "", "name": model.get("name"),
                         "source": model.get("source"), "resolved": model.get("resolved"),
                         "checkpoint": model.get("checkpoint"), "revision": model.get("revision"),
                         "weight processing": ", ".join(f"{step}={on}" for step, on in processing.items()) or "none",
                         "layers × d_mlp": f"{model.get('n_layers')} × {model.get('d_mlp')}",
                         "act_fn": model.get("act_fn"), "dtype": model.get("dtype"),
                         "training": json.dumps(model.get("training_record"))})
        out.append("<h3>Models</h3>" + sortable_table(pd.DataFrame(rows), table_id="prov-models"))
    token_set = inputs.get("token_set", {})
    if token_set:
        out.append("<h3>Token set</h3>" + key_value_table([
            ("hash", token_set.get("hash")), ("tokens counted", summary.get("universality", {}).get("n_tokens")),
            ("config", token_set.get("config")), ("source", token_set.get("source") or {}),
            ("tokenizer", token_set.get("tokenizer") or {})]))
    if inputs.get("mask_policy"):
        out.append("<h3>Mask policy</h3>" + key_value_table(list(inputs["mask_policy"].items())))
    cfg = summary.get("config", {})
    if cfg:
        corr = cfg.get("correlation", {})
        out.append("<h3>Correlation and flagging</h3>" + key_value_table(
            [("baseline", corr.get("baseline")), ("baseline seed", corr.get("seed")),
             *[(k, v) for k, v in corr.items() if k not in ("baseline", "seed")],
             ("threshold", cfg.get("threshold")), ("process_weights", cfg.get("process_weights")),
             ("store", cfg.get("store")), ("batch_rows", cfg.get("batch_rows"))]))
    for key in ("properties", "ablation", "persistence", "explanations", "agreement", "demo"):
        stage = summary.get(key)
        if isinstance(stage, dict) and stage:
            flat = [(k, v) for k, v in stage.items() if k not in ("training_records",)]
            out.append(f"<h3>{escape(key.capitalize())} stage</h3>" + key_value_table(flat))
    versions = summary.get("versions") or (models[0].get("versions") if models else {})
    if versions:
        out.append("<h3>Versions</h3>" + key_value_table(list(versions.items())))
    meta = [(k, summary.get(k)) for k in ("artefact", "schema_version", "created_utc", "host", "out_dir")
            if k in summary]
    if meta:
        out.append("<h3>Run</h3>" + key_value_table(meta))
    raw = html.escape(json.dumps(summary, indent=2, default=str))
    out.append(f"<details><summary>summary.json (everything above, verbatim)</summary><pre>{raw}</pre></details>")
    return "".join(out)
